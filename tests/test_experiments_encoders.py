"""Several encoders in one run (``ExperimentConfig.models``) and the paper reproduction configs."""

import json

import pytest

from experiments import report
from experiments.config import (
    CONFIG_HELP,
    NAMED_CONFIGS,
    PAPER_ENCODERS,
    ExperimentConfig,
    encoder_dir,
    get_config,
    per_encoder,
)
from experiments.run import cells, main, parse_args
from lora_jax import tasks
from lora_jax.errors import ConfigError
from lora_jax.testing import make_tiny_checkpoint


def test_paper_configs_hold_the_papers_grid():
    binary = get_config("paper_binary")
    assert binary.tasks == ("sst2", "mr", "cr", "qnli") and binary.models == PAPER_ENCODERS
    assert binary.ranks == (1, 2, 4, 8, 12, 16) and binary.seeds == (13, 21, 42, 87, 100)
    assert (binary.steps, binary.lr, binary.eval_every, binary.test_cap) == (1000, 1e-4, 100, 1000)
    runs = per_encoder(binary)
    assert [r.model for r in runs] == list(PAPER_ENCODERS)
    assert [r.name for r in runs] == [
        "FacebookAI--roberta-large",
        "google-bert--bert-base-uncased",
        "google--electra-base-discriminator",
    ]
    assert all(r.out.endswith("paper_binary") and not r.models for r in runs)
    assert len(cells(runs[0])) == 4 * 5 * (1 + 6)  # tasks x seeds x (zero-shot + ranks)
    assert get_config("paper_multiclass").tasks == ("mnli", "trec", "sst5")
    for name in ("paper_binary_offline", "paper_multiclass_offline"):
        cfg = get_config(name)
        assert cfg.model == "minilm" and not cfg.models
        assert set(cfg.tasks) <= set(tasks.OFFLINE_TASKS) and 1 in cfg.ranks and 12 in cfg.ranks
    assert get_config("paper_binary_offline").tasks == ("mr", "boolq", "subjrt")
    assert set(CONFIG_HELP) == set(NAMED_CONFIGS)
    for name in NAMED_CONFIGS:  # every task of every named config is registered
        for task in get_config(name).tasks:
            tasks.get_task(task)


def test_model_flag_picks_one_encoder_of_a_several_encoder_config():
    assert parse_args(["--config", "paper_binary"]).models == PAPER_ENCODERS
    one = parse_args(["--config", "paper_binary", "--model", "minilm"])
    assert one.models == () and one.model == "minilm" and per_encoder(one) == [one]
    two = parse_args(["--models", "org/a", "b"])
    assert two.models == ("org/a", "b")


def test_model_and_models_together_is_one_line(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", "minilm", "--models", "org/a", "b"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "both model and models are given" in err and "fix:" in err


def test_encoder_dirs_and_their_errors(tmp_path, capsys):
    assert encoder_dir("FacebookAI/roberta-large") == "FacebookAI--roberta-large"
    assert encoder_dir("minilm") == "minilm"
    (tmp_path / "my-bert").mkdir()
    assert encoder_dir(str(tmp_path / "my-bert") + "/") == "my-bert"
    assert encoder_dir("./ckpt/other") == "other"
    with pytest.raises(ConfigError, match="same run directory twice"):
        ExperimentConfig(models=(str(tmp_path / "my-bert"), "./x/my-bert"))
    with pytest.raises(SystemExit):
        parse_args(["--models", "minilm", "minilm"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "same run directory twice" in err and "fix:" in err
    with pytest.raises(ConfigError, match="empty model name"):
        ExperimentConfig(models=(" ",))


def test_default_config_json_is_unchanged_by_the_models_field():
    fields = ExperimentConfig().to_json()
    assert "models" not in fields and fields["model"] == "minilm"
    several = ExperimentConfig(models=("a/b", "c")).to_json()
    assert several["models"] == ["a/b", "c"] and "model" not in several


@pytest.fixture(scope="module")
def two_encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return [
        str(make_tiny_checkpoint(root / "tiny-roberta")),
        str(make_tiny_checkpoint(root / "tiny-bert", model_type="bert")),
    ]


def encoder_args(models, out, *extra):
    return [
        "--models", *models, "--out", str(out), "--name", "both", "--tasks", "mr",
        "--methods", "zero_shot", "lora", "--ranks", "1", "2", "--seeds", "13", "21",
        "--k", "4", "--steps", "2", "--eval-every", "2", "--batch-size", "4",
        "--max-length", "32", "--test-cap", "16", *extra,
    ]  # fmt: skip


def test_several_encoders_run_one_directory_each_and_a_combined_report(
    two_encoders, tmp_path, capsys
):
    main(encoder_args(two_encoders, tmp_path))
    parent = tmp_path / "both"
    assert json.loads((parent / "config.json").read_text())["models"] == two_encoders
    per = {}
    for path, name in zip(two_encoders, ("tiny-roberta", "tiny-bert"), strict=True):
        saved = json.loads((parent / name / "config.json").read_text())
        assert saved["model"] == path and saved["name"] == name and "models" not in saved
        per[name] = report.read_results(parent / name / "results.jsonl")
        assert len(per[name]) == 2 * (1 + 2)  # seeds x (zero-shot + 2 ranks)
        assert (parent / name / "report.md").exists()
    text = (parent / "report.md").read_text()
    assert "Encoders `tiny-roberta`, `tiny-bert`" in text
    assert "## tiny-roberta" in text and "## tiny-bert" in text
    assert "| tiny-bert | mr | 1 vs 2 | 2 |" in text  # no rank 12 here: the largest rank
    assert "| tiny-roberta | mr |" in text and "## Best rank" in text
    assert (parent / "plots" / "accuracy_vs_rank.png").stat().st_size > 1000

    # Resume: nothing left to run in either encoder's directory, same records.
    capsys.readouterr()
    main(encoder_args(two_encoders, tmp_path))
    assert capsys.readouterr().err.count("6 cells done, 0 to run") == 2
    for name, records in per.items():
        assert report.read_results(parent / name / "results.jsonl") == records
    # Another encoder list in the same directory is refused, in one line.
    with pytest.raises(SystemExit, match="different configuration .*models"):
        main(encoder_args(two_encoders[:1], tmp_path))
