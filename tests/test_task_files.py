"""Your own data on the command line: task files, saved adapters, TensorBoard curves.

One CLI run on a tiny model covers a CSV task (one text field, label names, a test file) and a
JSON-lines task (two text fields, class indices, a held-out test fraction) with
``--save-adapters --tensorboard``; the saved adapters are loaded back from disk and compared
with the in-memory best adapters of the run, and the event files are read back with
TensorBoard's own reader. Each bad task file gives one line naming the file, the field and the fix.
"""

import csv
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import report
from experiments.run import main
from lora_jax import models, tasks, train
from lora_jax.readout import make_output_fn
from lora_jax.testing import make_tiny_checkpoint

POSITIVE = [
    "a great film",
    "it was good",
    "really great",
    "great story",
    "a good cast",
    "good music",
    "great ending",
    "really good",
    "the movie is good",
    "the plot is good",
]
NEGATIVE = [
    "a terrible film",
    "it was bad",
    "really terrible",
    "bad story",
    "a bad cast",
    "boring music",
    "terrible ending",
    "really bad",
    "the film is bad",
    "the plot is bad",
]
REVIEWS = {
    "name": "reviews",
    "train": "reviews_train.csv",
    "test": "reviews_test.csv",
    "text_columns": ["text"],
    "label_column": "sentiment",
    "label_names": ["negative", "positive"],
    "label_words": ["terrible", "great"],
    "template": "{0} It was {mask} .",
}
PAIRS = {  # no name (the file name is used), no label_names (class indices), no test file
    "train": "data/pairs.jsonl",
    "text_columns": ["question", "answer"],
    "label_words": ["no", "yes"],
    "template": "{0} ? {mask} , {1}",
    "test_fraction": 0.25,
}


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "sentiment"])
        writer.writerows(rows)


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


@pytest.fixture()
def own_data(tmp_path):
    d = tmp_path / "data_home"
    (d / "data").mkdir(parents=True)
    rows = [(i, t, "positive") for i, t in enumerate(POSITIVE)]
    rows += [(i + 10, t, "negative") for i, t in enumerate(NEGATIVE)]
    _write_csv(d / "reviews_train.csv", rows[:6] + rows[10:16])
    _write_csv(d / "reviews_test.csv", rows[6:10] + rows[16:])
    with open(d / "data" / "pairs.jsonl", "w") as f:
        for i, (p, n) in enumerate(zip(POSITIVE, NEGATIVE, strict=True)):
            f.write(json.dumps({"question": "is it good", "answer": p, "label": 1}) + "\n")
            f.write(json.dumps({"question": f"is it good {i}", "answer": n, "label": 0}) + "\n")
    return d, _write_json(d / "reviews.json", REVIEWS), _write_json(d / "pairs.json", PAIRS)


def _args(model, out, *extra):
    return ["--model", model, "--out", str(out), "--name", "own", "--methods", "lora",
            "--ranks", "1", "--seeds", "13", "--k", "2", "--steps", "4", "--eval-every", "2",
            "--batch-size", "4", "--max-length", "32", "--test-cap", "8", *extra]  # fmt: skip


def test_task_files_run_end_to_end_with_saved_adapters_and_tensorboard(
    tiny, own_data, tmp_path, monkeypatch, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, reviews, pairs = own_data
    best = {}  # cell key -> (model_fn, frozen, best adapters): the in-memory result of the run
    real_fit = train.fit_job

    def spy_fit(model_fn, state, frozen, *args, **kwargs):
        results = real_fit(model_fn, state, frozen, *args, **kwargs)
        words, factors = kwargs["member_inputs"]  # each member's label words
        assert factors is None  # a job of one rank: nothing padded
        for i, (name, result) in enumerate(zip(kwargs["names"], results, strict=True)):
            best[name] = (model_fn, (frozen, (words[i], None)), result.best_trainable)
        return results

    monkeypatch.setattr(train, "fit_job", spy_fit)
    flags = ["--task-file", str(reviews), "--task-file", str(pairs)]
    main(_args(tiny, tmp_path, *flags, "--save-adapters", "--tensorboard"))
    run_dir = tmp_path / "own"
    records = report.read_results(run_dir / "results.jsonl")
    assert [r["task"] for r in records] == ["reviews", "pairs"]  # only the task files ran
    assert "| reviews |" in (run_dir / "report.md").read_text()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["tasks"] == [] and saved["task_files"] == [str(reviews), str(pairs)]
    assert sorted(saved["task_file_sha256"]) == sorted(saved["task_files"])

    tokenizer = models.load_tokenizer(tiny)
    for record, path in zip(records, (reviews, pairs), strict=True):
        key = f"{record['task']}/lora-r1/seed13"
        adapter_dir = run_dir / "adapters" / key.replace("/", "_")
        info = json.loads((adapter_dir / "task.json").read_text())
        spec = json.loads(path.read_text())
        assert (info["template"], info["label_words"]) == (spec["template"], spec["label_words"])
        assert info["head"] == "mlm" and info["test_accuracy"] == record["test_accuracy"]

        # Load the saved adapter from disk as a user would, and run the test split through it.
        task = tasks.load_task_file(path)
        test = tasks.few_shot_splits(task, k=2, seed=13, test_cap=8).test
        batch = tasks.encode(
            test, tokenizer, task, max_length=32, word_style=info["word_style"], pad_to="max_length"
        )
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        model = models.from_pretrained(tiny, head="mlm", adapter=adapter_dir)
        apply_fn, params = models.split(model)
        loaded = make_output_fn(apply_fn, "mlm", info["label_word_ids"])(params, batch)
        model_fn, frozen, adapters = best[key]
        in_memory = model_fn(adapters, frozen, batch, None)
        np.testing.assert_allclose(loaded, in_memory, atol=1e-5)
        accuracy = float(np.mean(np.argmax(loaded, -1) == np.asarray(batch["labels"])))
        assert accuracy == record["test_accuracy"]

        # TensorBoard's reader gives back every evaluation of the metrics file.
        acc = EventAccumulator(str(run_dir / "tensorboard" / key.replace("/", "_")))
        acc.Reload()
        evals = report.read_results(run_dir / "metrics" / (key.replace("/", "_") + ".jsonl"))
        assert [e["step"] for e in evals] == [2, 4]
        for tag, field in (("train/loss", "train_loss"), ("dev/accuracy", "dev_accuracy")):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [2, 4]
            np.testing.assert_allclose([e.value for e in events], [e[field] for e in evals])
        (final,) = acc.Scalars("best/test_accuracy")
        assert (final.step, final.value) == (record["best_step"], record["test_accuracy"])

    # The same command resumes with nothing to do, also with the task file and its data
    # copied to another path (a moved checkout); changed data is refused, not mixed in.
    capsys.readouterr()
    main(_args(tiny, tmp_path, *flags))
    assert "0 to run" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    main([a.replace(str(d), str(moved)) for a in _args(tiny, tmp_path, *flags)])
    assert "0 to run" in capsys.readouterr().err
    saved = json.loads((run_dir / "config.json").read_text())
    assert all(p.startswith(str(moved)) for p in saved["task_files"])
    with open(d / "reviews_train.csv", "a") as f:
        f.write("99,one more great film,positive\n")
    with pytest.raises(SystemExit, match="different configuration .*task_file_sha256"):
        main(_args(tiny, tmp_path, *flags))


def test_task_file_beside_registered_tasks_and_hub_dataset(own_data, tmp_path, monkeypatch):
    import datasets

    d, reviews, _ = own_data
    named = tasks.resolve_tasks(["mr"], [reviews], k=2)
    assert list(named) == ["mr", "reviews"] and named["reviews"].num_labels == 2
    with pytest.raises(tasks.TaskFileError, match="already in this run"):
        tasks.resolve_tasks([], [reviews, reviews])

    # "hub": a dataset read by datasets.load_dataset (here a local directory, offline).
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    hub_dir = tmp_path / "hub_home" / "dataset"
    hub_dir.mkdir(parents=True)
    (hub_dir / "train.csv").write_text((d / "reviews_train.csv").read_text())
    (hub_dir / "validation.csv").write_text((d / "reviews_test.csv").read_text())
    spec = {k: v for k, v in REVIEWS.items() if k not in ("train", "test", "name")}
    path = _write_json(tmp_path / "hub_home" / "hub.json", {**spec, "hub": {"path": "dataset"}})
    task = tasks.load_task_file(path, k=3)
    data = task.load()
    assert task.name == "hub" and (len(data.train), len(data.test)) == (12, 8)
    assert list(data.train.labels[:6]) == [1] * 6 and data.train.texts[0][0] == POSITIVE[0]
    # A hub id that cannot be had offline is one line too.
    _write_json(path, {**spec, "hub": {"path": "nobody/no-such-dataset"}})
    with pytest.raises(tasks.HubUnavailableError, match="'hub': datasets.load_dataset") as info:
        tasks.load_task_file(path)
    assert "\n" not in str(info.value) and "fix:" in str(info.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"text_columns": ["review"]}, "'text_columns' ['review'] not found in 'train' file"),
        ({"label_names": ["neg", "pos"]}, "labels ['positive', 'negative'] (first in example 1)"),
        ({"template": "{0} It was great ."}, "'template' '{0} It was great .' has no {mask}"),
        ({"templat": "{0} {mask}"}, "unknown key 'templat'; fix: did you mean 'template'?"),
        ({"label_words": ["bad", "good", "okay"]}, "'label_names' has 2 classes but"),
        ({"train": "missing.csv"}, "'train' file"),
        ({"template": "{0} {1} {mask}"}, "'template': template '{0} {1} {mask}' uses field {1}"),
        ({"name": "mr"}, "'name' 'mr' is a built-in task"),
        ({"train": "reviews_train.txt"}, "is not .csv, .jsonl or .jsonl.gz"),
        ("[1, 2]", "holds a JSON list"),
        ("{", "is not valid JSON"),
    ],
)
def test_bad_task_file_gives_one_line_naming_file_field_and_fix(own_data, tmp_path, change, needle):
    d, reviews, _ = own_data
    bad = d / "bad.json"
    if isinstance(change, str):
        bad.write_text(change)
    else:
        _write_json(bad, {**REVIEWS, **change})
    with pytest.raises(SystemExit) as info:
        main(["--task-file", str(bad), "--out", str(tmp_path), "--name", "bad"])
    message = str(info.value)
    assert message.startswith(f"error: task file {str(bad)!r}: ") and "\n" not in message
    assert needle in message and "fix:" in message
    assert not (tmp_path / "bad").exists()  # nothing written


def test_too_few_examples_per_class_names_the_class_and_the_largest_k(own_data, tmp_path):
    _, reviews, pairs = own_data
    with pytest.raises(SystemExit, match=r"class 'negative' has 6 training examples, but k=4 "
                       r"needs 8 per class .* or use k <= 3"):  # fmt: skip
        main(["--task-file", str(reviews), "--k", "4", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"class '1' has 7 training examples after the "
                       r"'test_fraction' hold-out"):  # fmt: skip
        main(["--task-file", str(pairs), "--k", "4", "--out", str(tmp_path)])


def test_tensorboard_without_tensorboardx_is_one_clear_line(own_data, tmp_path, monkeypatch):
    import sys

    _, reviews, _ = own_data
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="--tensorboard needs the tensorboardX package .* `uv "
                       "sync --extra tensorboard`"):  # fmt: skip
        main(["--task-file", str(reviews), "--k", "2", "--out", str(tmp_path), "--tensorboard"])
    assert not (tmp_path / "default").exists()


def test_missing_task_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"error: task file '.*nope\.json': no such file; fix:"):
        main(["--task-file", str(tmp_path / "nope.json"), "--out", str(tmp_path)])


@pytest.mark.parametrize("data", ["reviews_train.csv", "data/pairs.jsonl"])
def test_data_file_not_in_utf8_is_one_line_naming_it_and_the_fix(own_data, tmp_path, data):
    """A CSV saved as Latin-1 (Excel's default "CSV") used to end in a UnicodeDecodeError."""
    d, reviews, pairs = own_data
    path = d / data
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("a", "caf\u00e9", 1)
    path.write_bytes("".join(lines).encode("latin-1"))
    with pytest.raises(SystemExit) as info:
        main(["--task-file", str(reviews if data.endswith(".csv") else pairs),
              "--out", str(tmp_path), "--name", "latin1"])  # fmt: skip
    message = str(info.value)
    assert message.startswith("error: task file ") and "\n" not in message, message
    assert f"file {str(path)!r} is not UTF-8 text (line 4 has the byte b'\\xe9')" in message
    assert "fix: re-save it as UTF-8" in message
    assert not (tmp_path / "latin1").exists()
