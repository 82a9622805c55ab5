"""The command line: user errors as one line naming the fix, bugs with their traceback, flags
derived from the config dataclass, and the bad inputs that used to escape as raw errors."""

from __future__ import annotations

import dataclasses
import enum
import json
import pickle
import shutil
from pathlib import Path

import pytest

from experiments import jobs, report, run
from experiments.cli import add_dataclass_arguments, field_docs
from experiments.config import ExperimentConfig
from lora_jax import models
from lora_jax.errors import ConfigError, InputFileError, MissingFileError, UserError
from lora_jax.models.pretrained import read_torch_bin
from lora_jax.testing import make_tiny_checkpoint

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def zero_shot_args(model, out, *extra):
    """A run that trains nothing: zero-shot cells only, cheap."""
    return [
        "--model", model, "--out", str(out), "--name", "zs", "--tasks", "mr",
        "--methods", "zero_shot", "--seeds", "13", "21", "42", "--k", "4",
        "--max-length", "32", "--test-cap", "8", *extra,
    ]  # fmt: skip


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        run.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


# -- project error types (item 10) --------------------------------------------------------------


def test_error_types_are_user_errors_and_the_builtins_callers_expect():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(MissingFileError, UserError) and issubclass(MissingFileError, OSError)
    assert issubclass(models.CheckpointError, UserError)
    from lora_jax import tasks, train

    with pytest.raises(UserError):
        tasks.get_task("nosuchtask")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        train.TrainConfig(batch_size=0)


@pytest.mark.parametrize("bug", [KeyError("labels"), ValueError("a bug, not the user")])
def test_a_bug_keeps_its_traceback(tiny_roberta, tmp_path, monkeypatch, bug):
    """main() used to turn every KeyError / ValueError into one line, hiding bugs."""

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(run.jobs, "run_job", broken)
    with pytest.raises(type(bug)):
        run.main(zero_shot_args(tiny_roberta, tmp_path))


def test_user_errors_are_one_line(tiny_roberta, tmp_path, capsys):
    def error(model, *extra):
        return one_line_error(capsys, zero_shot_args(model, tmp_path / "runs", *extra))

    assert "unknown task 'nosuch'" in error(tiny_roberta, "--tasks", "nosuch")
    assert "No such model directory" in error(str(tmp_path / "missing"), "--name", "a")
    assert "k=100000" in error(tiny_roberta, "--k", "100000", "--name", "b")
    bare = tmp_path / "bare"  # a directory with a config but no tokenizer or weights
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    msg = error(str(bare), "--name", "c")
    assert str(bare) in msg and "tokenizer" in msg


def test_a_bad_model_leaves_no_run_directory(tiny_roberta, tmp_path, capsys):
    """A bad --model used to fail after runs/<name>/config.json was written."""
    out = tmp_path / "runs"
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_roberta, no_weights)
    (no_weights / "model.safetensors").unlink()
    for model, needle in [
        (str(tmp_path / "missing"), "No such model directory"),
        (str(not_a_model), "tokenizer"),
        (str(no_weights), "has no weights"),
    ]:
        msg = one_line_error(capsys, zero_shot_args(model, out, "--name", "bad"))
        assert needle in msg, msg
        assert not (out / "bad").exists(), model
    # Several encoders: the bad one is refused before the first encoder's run.
    two = ["--models", tiny_roberta, str(not_a_model), "--out", str(out), "--name", "two",
           "--tasks", "mr", "--methods", "zero_shot", "--seeds", "13", "--k", "4"]  # fmt: skip
    assert "tokenizer" in one_line_error(capsys, two)
    assert not (out / "two").exists()


def test_max_length_beyond_the_position_table_is_refused_in_cli_words(tmp_path, capsys):
    """--max-length 600 used to fail in training with "tokenize with truncation=True"."""
    argv = ["--out", str(tmp_path), "--name", "long", "--tasks", "mr", "--methods", "zero_shot",
            "--seeds", "13", "--k", "4", "--test-cap", "8", "--max-length", "600"]  # fmt: skip
    msg = one_line_error(capsys, argv)
    assert msg == (
        "error: --max-length 600 exceeds minilm's 512 positions; use --max-length 512 or less."
    )
    assert not (tmp_path / "long").exists()
    assert models.EncoderConfig(model_type="roberta", max_position_embeddings=514).max_tokens == 512
    relative = models.EncoderConfig(model_type="deberta-v2", position_biased_input=False)
    assert relative.max_tokens is None  # relative positions only: no table to exceed


# -- CLI flags from the dataclass fields (item 10) ----------------------------------------------


def test_every_experiment_field_has_a_flag_of_its_type():
    cfg = run.parse_args(
        ["--ranks", "2", "4", "--seeds", "7", "--lr", "0.5", "--alpha", "3", "--steps", "9",
         "--tasks", "mr", "trec", "--ntk", "--train-dropout", "--lora-dropout", "0.25",
         "--loss", "mse", "--targets", "query"]
    )  # fmt: skip
    assert cfg.ranks == (2, 4) and cfg.seeds == (7,) and cfg.tasks == ("mr", "trec")
    assert cfg.lr == 0.5 and cfg.alpha == 3.0 and cfg.steps == 9 and cfg.targets == "query"
    assert cfg.ntk is True and cfg.train_dropout is True and cfg.lora_dropout == 0.25
    assert cfg.loss.value == "mse"
    assert run.parse_args([]) == ExperimentConfig()  # no flag given: the named config
    docs = field_docs(ExperimentConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(ExperimentConfig)}


class Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


def test_a_new_field_gets_its_flag_from_its_type():
    import argparse

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        """A config.

        Attributes:
          widths: some widths,
            on two lines.
          rate: a rate.
          color: a color.
          fast: go fast.
          tag: an optional tag.
        """

        widths: tuple[float, ...] = (1.0,)
        rate: float | None = None
        color: Color = Color.RED
        fast: bool = False
        tag: str | None = None

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Cfg)
    args = parser.parse_args(["--widths", "1.5", "2", "--rate", "3", "--color", "blue", "--fast"])
    assert args.widths == [1.5, 2.0] and args.rate == 3.0 and args.color == "blue"
    assert args.fast is True and args.tag is None
    assert "on two lines" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--color", "green"])

    @dataclasses.dataclass(frozen=True)
    class Bad:
        mapping: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="Bad.mapping"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)


def test_a_run_directory_from_before_a_new_field_is_still_accepted(tmp_path):
    cfg = ExperimentConfig(out=str(tmp_path), name="old")
    (tmp_path / "old").mkdir()
    saved = cfg.to_json()
    del saved["train_dropout"], saved["lora_dropout"]  # written before these fields existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    run.prepare_run_dir(cfg)
    with pytest.raises(ConfigError, match="fields differ: train_dropout"):
        run.prepare_run_dir(dataclasses.replace(cfg, train_dropout=True))


def test_a_run_directory_from_before_a_renamed_field_reads_it_under_its_new_name(tmp_path):
    cfg = ExperimentConfig(out=str(tmp_path), name="old", train_dropout=True)
    (tmp_path / "old").mkdir()
    saved = cfg.to_json()
    saved["dropout"] = saved.pop("train_dropout")  # written when the field was `dropout`
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    run.prepare_run_dir(cfg)
    with pytest.raises(ConfigError, match="fields differ: train_dropout"):
        run.prepare_run_dir(dataclasses.replace(cfg, train_dropout=False))


# -- the three raw errors (item 6) --------------------------------------------------------------


def test_truncated_safetensors_names_the_file_and_the_fix(tiny_roberta, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_roberta, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(models.CheckpointError, match="truncated or corrupt"):
        models.from_pretrained(broken)
    msg = one_line_error(capsys, zero_shot_args(str(broken), tmp_path))
    assert str(weights) in msg and "download or save the model again" in msg


def test_truncated_torch_bin_is_reported_as_truncated_not_legacy(tiny_roberta, tmp_path, capsys):
    """A cut-short pytorch_model.bin used to be called a legacy (pre-zip) torch file."""
    broken = tmp_path / "broken_bin"
    shutil.copytree(tiny_roberta, broken)
    (broken / "model.safetensors").unlink()
    weights = broken / "pytorch_model.bin"
    whole = (GOLDEN / "bert_bin" / "pytorch_model.bin").read_bytes()
    for cut in (whole[:1000], whole[:-100], b""):  # an interrupted download; an empty file
        weights.write_bytes(cut)
        with pytest.raises(models.CheckpointError, match="truncated or corrupt") as info:
            models.from_pretrained(broken)
        assert "legacy" not in str(info.value)
    msg = one_line_error(capsys, zero_shot_args(str(broken), tmp_path))
    assert str(weights) in msg and "truncated" in msg and "download or save the model again" in msg
    legacy = tmp_path / "legacy.bin"  # torch.save before torch 1.6 wrote a bare pickle
    legacy.write_bytes(pickle.dumps({"w": [0.0]}, protocol=2))
    with pytest.raises(models.CheckpointError, match="legacy"):
        read_torch_bin(legacy)


def test_unwritable_out_names_the_directory(tiny_roberta, tmp_path, capsys):
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    msg = one_line_error(capsys, zero_shot_args(tiny_roberta, not_a_dir / "runs"))
    assert "cannot write the run directory" in msg and "--out" in msg


def test_torn_last_line_is_skipped_with_a_warning_and_its_cell_redone(tiny_roberta, tmp_path):
    args = zero_shot_args(tiny_roberta, tmp_path)
    run.main(args)
    path = tmp_path / "zs" / "results.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # killed mid-write
    with pytest.warns(UserWarning, match="last line was cut short"):
        assert len(report.read_results(path)) == 2
    with pytest.warns(UserWarning, match="last line was cut short"):
        run.main(args)
    records = report.read_results(path)
    assert len(records) == 3
    assert [json.dumps(r) for r in records[:2]] == lines[:2]  # the finished cells are kept
    assert sorted(r["seed"] for r in records) == [13, 21, 42]
    redone, before = records[2], json.loads(lines[2])  # the torn cell, run again
    assert {**redone, "seconds": 0} == {**before, "seconds": 0}


def test_a_bad_line_inside_results_is_an_error_naming_it(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 2}\n')
    with pytest.raises(InputFileError, match="line 2"):
        report.read_results(path)


def test_steps_20_and_dropout_reach_the_training_config():
    """``--steps 20`` was refused (default eval_every=25 did not divide it); and
    --train-dropout reaches the training config."""
    cfg = run.parse_args(["--steps", "20", "--train-dropout", "--lora-dropout", "0.1"])
    cell = run.Cell("mr", "lora", 4, 13)
    tcfg = jobs.train_config(cfg, cell)
    assert (tcfg.steps, tcfg.eval_every, tcfg.train_dropout) == (20, 25, True)
    assert jobs.lora_config(cfg, 4, "roberta").dropout == 0.1
    assert jobs.train_config(run.parse_args([]), cell).train_dropout is False


@pytest.mark.parametrize("vectorize", ["--vectorize", "--no-vectorize"])
def test_a_batch_larger_than_the_training_set_names_the_cell(
    tiny_roberta, tmp_path, capsys, vectorize
):
    """k = 4 per class on MR is 8 examples: --batch-size 16 used to end in a traceback from
    deep inside jax (the packed-length schedule) or name "member 0"."""
    argv = zero_shot_args(tiny_roberta, tmp_path / "runs", "--methods", "lora", "--ranks", "1")
    message = one_line_error(capsys, [*argv, "--batch-size", "16", "--steps", "2", vectorize])
    assert message.startswith("error: mr/lora-r1/seed13: the training set has 8 examples, fewer ")
    assert "--batch-size) to 8 or less" in message
