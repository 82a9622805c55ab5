"""experiments.run with --vectorize (LoRA cells of a task as one job) vs --no-vectorize."""

import numpy as np
import pytest
from test_experiments import smoke_args
from test_task_files import NEGATIVE, POSITIVE  # the same few reviews

from experiments import report
from experiments.jobs import plan_jobs
from experiments.run import main
from lora_jax import checkpoint
from lora_jax.testing import make_tiny_checkpoint

COMPARED = ("dev_accuracy", "test_accuracy", "best_step", "trainable_params")


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def _by_key(records):
    return {(r["task"], r["method"], r["rank"], r["seed"]): r for r in records}


def test_vectorized_run_resumes_and_writes_the_same_results_as_sequential(
    tiny_roberta, tmp_path, monkeypatch, capsys
):
    grid = ("--methods", "zero_shot", "lora", "--steps", "6", "--lr", "3e-2")
    main(smoke_args(tiny_roberta, tmp_path / "seq", *grid, "--no-vectorize"))

    # The vectorized run is stopped inside its LoRA job (at its second checkpoint), then
    # resumed: the finished zero-shot cells are kept and the job continues from its checkpoint.
    real_save, saves = checkpoint.save, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(smoke_args(tiny_roberta, tmp_path / "vec", *grid, "--vectorize"))
    monkeypatch.setattr(checkpoint, "save", real_save)
    capsys.readouterr()
    main(smoke_args(tiny_roberta, tmp_path / "vec", *grid, "--vectorize"))
    assert "2 cells done, 4 to run" in capsys.readouterr().err

    seq = _by_key(report.read_results(tmp_path / "seq" / "smoke" / "results.jsonl"))
    vec = _by_key(report.read_results(tmp_path / "vec" / "smoke" / "results.jsonl"))
    assert seq.keys() == vec.keys() and len(seq) == 2 + 2 * 2  # zero-shot + 2 ranks, 2 seeds
    for key, record in seq.items():
        assert list(vec[key]) == list(record)  # same fields, same order
        assert {k: vec[key][k] for k in COMPARED} == {k: record[k] for k in COMPARED}, key
    # The training curves match too (the accuracies of so short a run may all be equal).
    for name in [f"mr_lora-r{r}_seed{s}.jsonl" for r in (1, 2) for s in (13, 21)]:
        curves = [
            report.read_results(tmp_path / d / "smoke" / "metrics" / name) for d in ("seq", "vec")
        ]
        assert [c["step"] for c in curves[0]] == [c["step"] for c in curves[1]] == [2, 4, 6]
        for a, b in zip(*curves, strict=True):
            np.testing.assert_allclose(
                [a["train_loss"], a["dev_loss"]], [b["train_loss"], b["dev_loss"]], rtol=1e-5
            )


class _Cell:
    def __init__(self, task, method):
        self.task, self.method = task, method


def test_plan_jobs_groups_lora_cells_per_task_under_the_cap():
    grid = [_Cell(t, m) for t in ("a", "b") for m in ["zero_shot"] + ["lora"] * 5]
    jobs = plan_jobs(grid, members=2)
    assert [(j[0].task, j[0].method, len(j)) for j in jobs] == [
        ("a", "zero_shot", 1),
        ("a", "lora", 2),
        ("a", "lora", 2),
        ("a", "lora", 1),
        ("b", "zero_shot", 1),
        ("b", "lora", 2),
        ("b", "lora", 2),
        ("b", "lora", 1),
    ]
    assert [len(j) for j in plan_jobs(grid, members=4)] == [1, 3, 2, 1, 3, 2]
    assert all(len(j) == 1 for j in plan_jobs(grid, members=0))


def test_save_adapters_are_the_same_for_a_job_and_for_its_cells_alone(
    tiny_roberta, tmp_path, capsys
):
    """--save-adapters used to turn vectorized jobs off; now a job saves each member's adapter,
    cut to its own rank, as the cell trained alone saves it (PEFT files, task.json)."""
    import json
    import os

    from lora_jax import lora

    grid = ("--methods", "lora", "--steps", "4", "--lr", "3e-2", "--save-adapters")
    for name, flag in (("seq", "--no-vectorize"), ("vec", "--vectorize")):
        main(smoke_args(tiny_roberta, tmp_path / name, *grid, flag))
    assert "mr lora x4" in capsys.readouterr().err  # the vectorized run trained one job of 4
    for r in (1, 2):
        for s in (13, 21):
            cell = f"mr_lora-r{r}_seed{s}"
            dirs = [tmp_path / d / "smoke" / "adapters" / cell for d in ("seq", "vec")]
            (seq, seq_cfg), (vec, vec_cfg) = (lora.load_peft(d) for d in dirs)
            assert seq_cfg == vec_cfg and vec_cfg.r == r
            assert seq.keys() == vec.keys()
            for path in seq:
                for leaf in seq[path]:
                    assert vec[path][leaf].shape == seq[path][leaf].shape
                    # Adam divides by sqrt(v): float rounding of tiny gradients shows at ~1e-5.
                    np.testing.assert_allclose(vec[path][leaf], seq[path][leaf], atol=1e-4)
            infos = [json.load(open(os.path.join(d, "task.json"))) for d in dirs]
            assert {k: infos[1][k] for k in COMPARED} == {k: infos[0][k] for k in COMPARED}


def _task_files(directory):
    """Two task files of one shape (K = 2, the same texts) with different label words."""
    import csv
    import json

    def write(name, rows):
        with open(directory / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "sentiment"])
            writer.writerows(rows)

    write("train.csv", [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE])
    good, bad = ("great music", "good film", "really good film"), ("bad music", "a bad film")
    write("test.csv", [(t, "positive") for t in good] + [(t, "negative") for t in bad])
    paths = []
    for name, words in (("words_a", ["terrible", "great"]), ("words_b", ["bad", "good"])):
        spec = {"name": name, "train": "train.csv", "test": "test.csv", "text_columns": ["text"],
                "label_column": "sentiment", "label_names": ["negative", "positive"],
                "label_words": words, "template": "{0} It was {mask} ."}  # fmt: skip
        paths.append(directory / f"{name}.json")
        paths[-1].write_text(json.dumps(spec))
    return paths


def test_tasks_of_one_shape_share_a_job_with_the_records_of_their_cells_alone(
    tiny_roberta, tmp_path, monkeypatch, capsys
):
    """Two tasks of one shape (K = 2, one padded length) train as one job of both tasks'
    LoRA cells, each member reading its own task's label words and tested on its own task's
    test set; stopped mid-job and resumed, it writes the records of the cells run alone."""
    from experiments import jobs

    a, b = _task_files(tmp_path)
    grid = ["--model", tiny_roberta, "--name", "smoke", "--task-file", str(a), str(b),
            "--methods", "lora", "--ranks", "1", "2", "--seeds", "13", "--k", "4",
            "--steps", "6", "--eval-every", "2", "--batch-size", "4", "--lr", "3e-2",
            "--max-length", "32"]  # fmt: skip
    ran = []
    real_run_job = jobs.run_job

    def counting(bench, cfg, job, *args, **kwargs):
        ran.append(jobs.job_tasks(job))
        return real_run_job(bench, cfg, job, *args, **kwargs)

    monkeypatch.setattr(jobs, "run_job", counting)
    main([*grid, "--out", str(tmp_path / "seq"), "--no-vectorize"])
    assert len(ran) == 4  # 2 tasks x 2 ranks, one at a time

    real_save, saves = checkpoint.save, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    ran.clear()
    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main([*grid, "--out", str(tmp_path / "vec"), "--vectorize"])
    ckpt = tmp_path / "vec" / "smoke" / "ckpt" / jobs.job_name(_lora_cells())
    assert ckpt.is_dir() and ckpt.name.startswith("words_a+words_b_lora_job_")
    monkeypatch.setattr(checkpoint, "save", real_save)
    capsys.readouterr()
    main([*grid, "--out", str(tmp_path / "vec"), "--vectorize"])
    assert ran == [["words_a", "words_b"]] * 2  # one job of both tasks, started twice
    err = capsys.readouterr().err
    assert "0 cells done, 4 to run" in err and "words_a+words_b lora x4" in err
    assert not ckpt.exists()  # the finished job's checkpoint is gone

    seq = _by_key(report.read_results(tmp_path / "seq" / "smoke" / "results.jsonl"))
    vec = _by_key(report.read_results(tmp_path / "vec" / "smoke" / "results.jsonl"))
    assert seq.keys() == vec.keys() and len(seq) == 4
    for key, record in seq.items():
        assert list(vec[key]) == list(record)
        assert {k: vec[key][k] for k in COMPARED} == {k: record[k] for k in COMPARED}, key
    # The curves hold each step once: the resumed job went on from its checkpoint at step 4.
    for cell in _lora_cells():
        name = cell.key.replace("/", "_") + ".jsonl"
        curves = [
            report.read_results(tmp_path / d / "smoke" / "metrics" / name) for d in ("seq", "vec")
        ]
        assert [c["step"] for c in curves[0]] == [c["step"] for c in curves[1]] == [2, 4, 6]
        for x, y in zip(*curves, strict=True):
            assert x["dev_accuracy"] == y["dev_accuracy"]
            np.testing.assert_allclose(
                [x["train_loss"], x["dev_loss"]], [y["train_loss"], y["dev_loss"]], rtol=1e-5
            )
    # The tasks' label words differ, and so do their members' curves.
    first = [report.read_results(tmp_path / "seq" / "smoke" / "metrics" / f) for f in
             ("words_a_lora-r1_seed13.jsonl", "words_b_lora-r1_seed13.jsonl")]  # fmt: skip
    assert first[0][0]["dev_loss"] != first[1][0]["dev_loss"]


def _lora_cells():
    from experiments.jobs import Cell

    return [Cell(t, "lora", r, 13) for t in ("words_a", "words_b") for r in (1, 2)]
