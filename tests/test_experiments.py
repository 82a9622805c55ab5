"""experiments.run end to end on a tiny model: results, report, plot, resume, config errors."""

import json

import pytest

from experiments import report
from experiments.config import ExperimentConfig, get_config
from experiments.run import cells, main, parse_args
from lora_jax.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def smoke_args(model, out, *extra):
    return [
        "--model",
        model,
        "--out",
        str(out),
        "--name",
        "smoke",
        "--tasks",
        "mr",
        "--methods",
        "zero_shot",
        "head",
        "lora",
        "--ranks",
        "1",
        "2",
        "--seeds",
        "13",
        "21",
        "--k",
        "4",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--test-cap",
        "16",
        *extra,
    ]


def test_cli_smoke_run_writes_results_report_plot_and_resumes(tiny_roberta, tmp_path, capsys):
    main(smoke_args(tiny_roberta, tmp_path))
    run_dir = tmp_path / "smoke"
    records = report.read_results(run_dir / "results.jsonl")
    assert len(records) == 2 * (1 + 1 + 2)  # seeds x (zero_shot + head + 2 ranks)
    for r in records:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["trainable_params"] > 0 or r["method"] == "zero_shot"
    lora_r1 = next(r for r in records if r["method"] == "lora" and r["rank"] == 1)
    lora_r2 = next(r for r in records if r["method"] == "lora" and r["rank"] == 2)
    assert lora_r2["trainable_params"] == 2 * lora_r1["trainable_params"]
    text = (run_dir / "report.md").read_text()
    assert "| mr |" in text and "lora r=2" in text
    assert (run_dir / "plots" / "accuracy_vs_rank.png").stat().st_size > 1000
    assert not (run_dir / "ckpt").exists() or not any((run_dir / "ckpt").iterdir())

    # Re-running the finished run does no new work and keeps the same lines.
    capsys.readouterr()
    main(smoke_args(tiny_roberta, tmp_path))
    assert "0 to run" in capsys.readouterr().err
    assert report.read_results(run_dir / "results.jsonl") == records


def test_different_config_in_same_directory_is_refused(tiny_roberta, tmp_path):
    out = tmp_path / "runs"
    (out / "smoke").mkdir(parents=True)
    cfg = parse_args(smoke_args(tiny_roberta, out))
    saved = {**cfg.to_json(), "k": 64}
    (out / "smoke" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="different configuration .*k"):
        main(smoke_args(tiny_roberta, out))


def test_unknown_config_task_and_method_errors(tiny_roberta, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--config", "nope"])
    assert "Unknown config 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown methods"):
        ExperimentConfig(methods=("lora", "magic"))
    with pytest.raises(SystemExit, match="unknown task 'nosuchtask'"):
        main(smoke_args(tiny_roberta, tmp_path, "--tasks", "nosuchtask"))
    assert not (tmp_path / "smoke").exists()
    with pytest.raises(SystemExit, match="No such model directory"):
        main(smoke_args(str(tmp_path / "missing"), tmp_path, "--name", "other"))


def test_named_configs_are_valid_and_cells_cover_the_grid():
    cfg = get_config("rank_sweep")
    grid = cells(cfg)
    assert len(grid) == len(cfg.tasks) * len(cfg.seeds) * (1 + len(cfg.ranks))
    assert len({c.key for c in grid}) == len(grid)
    assert get_config("default", steps=10).steps == 10


def test_ntk_analysis_cells_report_linearized_and_kernel_fields(tiny_roberta, tmp_path):
    args = smoke_args(
        tiny_roberta,
        tmp_path,
        "--name",
        "ntk",
        "--methods",
        "lora",
        "--ranks",
        "1",
        "--seeds",
        "13",
        "--ntk",
    )
    main(args)
    (record,) = report.read_results(tmp_path / "ntk" / "results.jsonl")
    for key in (
        "ntk_acc_trained",
        "ntk_acc_linearized_trained",
        "ntk_acc_kernel",
        "ntk_agree_trained_vs_kernel",
        "ntk_agree_trained_vs_lin_trained",
        # An AdamW cell: its optimizer's kernel (A-SignGD) beside the SGD eNTK (--ntk-kernel
        # matched, the default).
        "ntk_acc_kernel_asigngd",
        "ntk_agree_trained_vs_kernel_asigngd",
    ):
        assert 0.0 <= record[key] <= 1.0, key
    assert record["ntk_kernel_relative_change"] >= 0.0  # the SGD kernel's, as before
    # The fine-tuned accuracy of the analysis is the cell's own test accuracy.
    assert record["ntk_acc_trained"] == record["test_accuracy"]
    text = (tmp_path / "ntk" / "report.md").read_text()
    assert "## NTK regime" in text and "A-SignGD kernel" in text


def test_gains_table_is_paired_against_zero_shot():
    from experiments import report

    recs = [{"task": "mr", "method": "zero_shot", "rank": None, "test_accuracy": 0.60}]
    for seed, acc in zip((13, 21, 42), (0.62, 0.66, 0.70), strict=True):
        recs.append({"task": "mr", "method": "lora", "rank": 1, "seed": seed, "test_accuracy": acc})
    recs.append({"task": "mr", "method": "head", "rank": None, "seed": 13, "test_accuracy": 0.5})
    table = report.gains_table(recs)
    # gains 2, 6, 10 points: mean 6, sample std 4, t = 6 / (4 / sqrt 3) = 2.598
    assert "| mr | lora r=1 | +6.0 ± 4.0 | +2.0 | 3/3 | 2.6 |" in table
    assert "| mr | head | -10.0 ± 0.0 | -10.0 | 0/1 | nan |" in table
    assert report.gains_table([r for r in recs if r["method"] != "zero_shot"]) == ""
