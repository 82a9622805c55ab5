"""Tasks described by a JSON "task file": your own labelled sentences on the command line.

A task file is a JSON object with the arguments of `csv_task` / `jsonl_task`; paths are relative
to the task file::

    {
      "name": "reviews",
      "train": "reviews_train.csv",
      "test": "reviews_test.csv",
      "text_columns": ["text"],
      "label_column": "label",
      "label_names": ["negative", "positive"],
      "label_words": ["terrible", "great"],
      "template": "{0} It was {mask} ."
    }

Keys (`TASK_FILE_KEYS`):

- ``train``: a ``.csv`` (with a header row), ``.jsonl`` or ``.jsonl.gz`` file of examples.
- ``test`` (optional): the test examples, same format; without it a fixed ``test_fraction``
  (default 0.2) of ``train`` is held out, as in `csv_task`.
- ``text_columns``: one or two column names (a string for one), in template order.
- ``label_column`` (default ``"label"``): label names from ``label_names``, or class indices
  ``0..K-1`` (JSON-lines labels may also be booleans).
- ``label_names`` (optional): the K class names in index order; default ``"0"..."K-1"``.
- ``label_words``: K bare verbalizer words, one per class.
- ``template``: prompt template with ``{0}`` (``{1}``) and exactly one ``{mask}``.
- ``name`` (optional): the name in results and reports; default the task file's name.
- ``hub`` (instead of ``train`` / ``test``): ``{"path": ..., "config": ..., "train_split":
  "train", "test_split": "validation"}``, a dataset read by ``datasets.load_dataset(path,
  config)``: a hub id, or a dataset directory (relative to the task file).

`load_task_file` reads and checks everything up front (the data too), so a bad file fails with
one line naming the task file, the field and the fix before any training starts.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_jax.errors import InputFileError, MissingFileError
from lora_jax.tasks.local import _examples, _file_task, _label_index
from lora_jax.tasks.registry import TASKS, HubUnavailableError, _normalize, get_task
from lora_jax.tasks.task import Task, TaskData, parse_template

__all__ = [
    "HUB_KEYS",
    "TASK_FILE_KEYS",
    "TaskFileError",
    "load_task_file",
    "resolve_tasks",
    "task_file_digest",
]

TASK_FILE_KEYS: tuple[str, ...] = (
    "name",
    "train",
    "test",
    "test_fraction",
    "text_columns",
    "label_column",
    "label_names",
    "label_words",
    "template",
    "hub",
)
HUB_KEYS: tuple[str, ...] = ("path", "config", "train_split", "test_split")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_EXAMPLE_TEMPLATE = '"{0} It was {mask} ."'


class TaskFileError(InputFileError):
    """A task file (or a data file it names) that cannot be used (a ValueError).

    The message is one line: the task file, the field at fault and the fix.
    """


def _fail(path: Path, message: str) -> TaskFileError:
    return TaskFileError(f"task file {str(path)!r}: {message}")


def _read_spec(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(
            f"task file {str(path)!r}: no such file; fix: pass the path of an existing .json file"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"is not valid JSON ({err}); fix: write one JSON object") from None
    if not isinstance(spec, dict):
        raise _fail(
            path, f"holds a JSON {type(spec).__name__}; fix: write one JSON object of task fields"
        )
    unknown = [k for k in spec if k not in TASK_FILE_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, TASK_FILE_KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _fail(
            path,
            f"unknown key {key!r}; fix: {hint}use only the keys {list(TASK_FILE_KEYS)}",
        )
    return spec


def _strings(path: Path, spec: dict, key: str, *, lo: int, hi: int | None) -> tuple[str, ...]:
    value = spec[key]
    if isinstance(value, str) and lo == 1:
        value = [value]
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    count = f"{lo} or {hi}" if hi == lo + 1 else f"at least {lo}"
    if not ok or len(value) < lo or (hi is not None and len(value) > hi):
        raise _fail(path, f"{key!r} is {value!r}; fix: give a list of {count} non-empty strings")
    return tuple(value)


def _string(path: Path, spec: dict, key: str, default: str | None = None) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or not value:
        raise _fail(path, f"{key!r} is {value!r}; fix: give a non-empty string")
    return value


_REQUIRED_EXAMPLES = {
    "text_columns": '"text_columns": ["text"]',
    "label_words": '"label_words": ["terrible", "great"]',
    "template": '"template": "{0} It was {mask} ."',
}


def _require(path: Path, spec: dict) -> None:
    missing = [k for k in _REQUIRED_EXAMPLES if k not in spec]
    if missing:
        key = missing[0]
        raise _fail(path, f"missing key {key!r}; fix: add it, e.g. {_REQUIRED_EXAMPLES[key]}")


def _check_template(path: Path, template: str, num_fields: int) -> None:
    if "{mask}" not in template:
        raise _fail(
            path,
            f"'template' {template!r} has no {{mask}}; fix: put {{mask}} where the label word "
            f"goes, e.g. {_EXAMPLE_TEMPLATE}",
        )
    try:
        parse_template(template, num_fields)
    except ValueError as err:
        raise _fail(
            path, f"'template': {err}; fix: see the template syntax in lora_jax.tasks.task"
        ) from None


# ----------------------------------------------------------------------------- reading rows


def _data_format(path: Path, key: str, data: Path) -> str:
    name = data.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    raise _fail(
        path,
        f"{key!r} file {data.name!r} is not .csv, .jsonl or .jsonl.gz; fix: convert "
        "it to one of those formats",
    )


def _read_rows(path: Path, key: str, data: Path) -> list[dict[str, Any]]:
    """The rows of one data file (a list of dicts), with errors naming the task-file field."""
    fmt = _data_format(path, key, data)
    if not data.is_file():
        raise _fail(
            path,
            f"{key!r} file {str(data)!r} does not exist; fix: give a path relative "
            "to the task file",
        )
    try:
        return _parse_rows(path, key, data, fmt)
    except UnicodeDecodeError:
        opener = gzip.open if data.name.lower().endswith(".gz") else open
        with opener(data, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
            where = ""
        except UnicodeDecodeError as err:  # the first byte that is not UTF-8, in the whole file
            line = raw[: err.start].count(b"\n") + 1
            where = f" (line {line} has the byte {raw[err.start : err.start + 1]!r})"
        raise _fail(
            path,
            f"{key!r} file {str(data)!r} is not UTF-8 text{where}; fix: re-save it as UTF-8 "
            "(e.g. from a spreadsheet: Save As, CSV UTF-8)",
        ) from None


def _parse_rows(path: Path, key: str, data: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "csv":
        with open(data, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    opener = gzip.open if data.name.lower().endswith(".gz") else open
    rows = []
    with opener(data, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise _fail(
                    path,
                    f"{key!r} file {data.name!r} line {line_no} is not JSON "
                    f"({err.msg}); fix: one JSON object per line",
                ) from None
            if not isinstance(row, dict):
                raise _fail(
                    path,
                    f"{key!r} file {data.name!r} line {line_no} is not a JSON "
                    "object; fix: one JSON object per line",
                )
            rows.append(row)
    return rows


def _check_rows(
    path: Path,
    where: str,
    rows: Sequence[dict[str, Any]],
    text_columns: tuple[str, ...],
    label_column: str,
    label_names: tuple[str, ...],
) -> None:
    """Checks that every row has the columns and a label that maps to a class."""
    if not rows:
        raise _fail(path, f"{where} holds no examples; fix: add labelled rows")
    columns = list(rows[0])
    for field, wanted in (("text_columns", text_columns), ("label_column", (label_column,))):
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise _fail(
                path,
                f"{field!r} {missing} not found in {where} (its columns: {columns}); fix: set "
                f"{field!r} to columns of that file",
            )
    for i, row in enumerate(rows):
        gaps = [c for c in (*text_columns, label_column) if row.get(c) is None]
        if gaps:
            raise _fail(
                path,
                f"{where} example {i + 1} has no value for {gaps}; fix: fill it in "
                "or remove that example",
            )
    bad: dict[str, int] = {}
    for i, row in enumerate(rows):
        try:
            _label_index(row[label_column], label_names, where)
        except ValueError:
            bad.setdefault(repr(row[label_column]), i + 1)
    if bad:
        values = ", ".join(list(bad)[:5]) + (", ..." if len(bad) > 5 else "")
        first = next(iter(bad.values()))
        raise _fail(
            path,
            f"'label_column' {label_column!r} of {where} holds labels [{values}] (first in "
            f"example {first}) that are not in 'label_names' {list(label_names)}; fix: list "
            f"every label value in 'label_names', or write labels as class indices "
            f"0..{len(label_names) - 1}",
        )


# ----------------------------------------------------------------------------- hub datasets


def _hub_rows(path: Path, hub: Any, label_column: str) -> dict[str, list[dict]]:
    if not isinstance(hub, dict) or "path" not in hub:
        raise _fail(
            path,
            f"'hub' is {hub!r}; fix: give an object such as "
            '{"path": "user/dataset", "config": null}',
        )
    unknown = [k for k in hub if k not in HUB_KEYS]
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} in 'hub'; fix: use only {list(HUB_KEYS)}")
    splits = {"train": hub.get("train_split", "train"), "test": hub.get("test_split", "validation")}
    import datasets

    local = path.parent / str(hub["path"])  # a dataset directory beside the task file
    source = str(local) if local.is_dir() else hub["path"]
    try:
        dataset = datasets.load_dataset(source, hub.get("config"))
    except Exception as err:  # offline, no cache, no network, bad id: all surface differently
        raise HubUnavailableError(
            f"task file {str(path)!r}: 'hub': datasets.load_dataset({hub['path']!r}, "
            f"{hub.get('config')!r}) failed ({type(err).__name__}: {' '.join(str(err).split())}); "
            "fix: check the id and "
            "the network (HF_DATASETS_OFFLINE), or use 'train' / 'test' files instead"
        ) from err
    rows = {}
    for role, split in splits.items():
        if split not in dataset:
            raise _fail(
                path,
                f"'hub' dataset has no split {split!r} (splits: {list(dataset)}); "
                f"fix: set 'hub'.'{role}_split'",
            )
        # Datasets mark unlabelled examples (GLUE's test split, SNLI) with the label -1.
        rows[role] = [r for r in dataset[split].to_list() if r.get(label_column) != -1]
    return rows


# ----------------------------------------------------------------------------- the task


def load_task_file(path: str | os.PathLike, *, k: int | None = None) -> Task:
    """Reads a task file (see the module doc) and checks it and its data.

    Args:
      path: the JSON task file; its ``train`` / ``test`` paths are relative to it.
      k: when given, also checks that every class has the 2k training examples that k-shot
        sampling needs (k train + k dev).

    Returns:
      A `Task` whose data is already read (``task.load()`` does no more I/O).

    Raises:
      MissingFileError: no such task file.
      TaskFileError: (a ValueError) with one line naming the task file, the field and the fix:
        unknown keys, missing columns, labels not in ``label_names``, a template without
        ``{mask}``, fewer than 2k examples in a class, ...
      HubUnavailableError: ``hub`` was given and ``datasets.load_dataset`` failed.
    """
    path = Path(path)
    spec = _read_spec(path)
    _require(path, spec)
    if ("hub" in spec) == ("train" in spec):
        raise _fail(
            path,
            "needs exactly one of 'train' (a data file) and 'hub' (a dataset); "
            "fix: give 'train' (and optionally 'test'), or 'hub'",
        )
    if "hub" in spec and ("test" in spec or "test_fraction" in spec):
        raise _fail(
            path,
            "'test' / 'test_fraction' go with 'train' files, not with 'hub'; fix: "
            "set 'hub'.'test_split' instead",
        )
    name = _string(path, spec, "name", path.name.removesuffix(".json"))
    if not _NAME.match(name):
        raise _fail(
            path,
            f"'name' {name!r} is not a plain name; fix: use letters, digits, '_', "
            "'-' and '.' only (it names result rows and directories)",
        )
    if _normalize(name) in TASKS:
        raise _fail(path, f"'name' {name!r} is a built-in task; fix: set another 'name'")
    text_columns = _strings(path, spec, "text_columns", lo=1, hi=2)
    label_words = _strings(path, spec, "label_words", lo=2, hi=None)
    for word in label_words:
        if word != word.strip():
            raise _fail(
                path,
                f"'label_words' has {word!r}; fix: write the words bare, without "
                "spaces (the model's spelling adds a leading space where it needs one)",
            )
    label_names = (
        _strings(path, spec, "label_names", lo=2, hi=None)
        if "label_names" in spec
        else tuple(str(i) for i in range(len(label_words)))
    )
    if len(label_names) != len(label_words):
        raise _fail(
            path,
            f"'label_names' has {len(label_names)} classes but 'label_words' has "
            f"{len(label_words)}; fix: give one label word per class",
        )
    if len(set(label_names)) != len(label_names):
        raise _fail(
            path, f"'label_names' {list(label_names)} repeats a name; fix: name each class once"
        )
    label_column = _string(path, spec, "label_column", "label")
    template = _string(path, spec, "template")
    _check_template(path, template, len(text_columns))

    def checked(rows: list[dict], where: str) -> list[dict]:
        _check_rows(path, where, rows, text_columns, label_column, label_names)
        return rows

    if "hub" in spec:
        hub = _hub_rows(path, spec["hub"], label_column)
        where = f"'hub' dataset {spec['hub']['path']!r}"

        def split(role: str):
            rows = checked(hub[role], f"{where} {role} split")
            return _examples(rows, text_columns, label_column, label_names, where)

        data = TaskData(train=split("train"), test=split("test"))
        source = f"{path}: datasets.load_dataset({spec['hub']['path']!r}, "
        source += f"{spec['hub'].get('config')!r})"
    else:
        base = path.parent
        files = {key: base / _string(path, spec, key) for key in ("train", "test") if key in spec}
        cache: dict[Path, list[dict]] = {}

        def reader(data: str | os.PathLike) -> list[dict]:
            data = Path(data)
            if data not in cache:
                key = "train" if data == files["train"] else "test"
                cache[data] = checked(_read_rows(path, key, data), f"{key!r} file {data.name!r}")
            return cache[data]

        fraction = spec.get("test_fraction", 0.2)
        if "test" in spec and "test_fraction" in spec:
            raise _fail(
                path,
                "'test_fraction' holds out part of 'train' when there is no "
                "'test' file; fix: drop one of the two",
            )
        if not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
            raise _fail(path, f"'test_fraction' is {fraction!r}; fix: give a number in (0, 1)")
        for data in files.values():
            reader(data)
        lazy = _file_task(reader)(
            files["train"],
            text_columns=text_columns,
            label_column=label_column,
            label_words=label_words,
            template=template,
            label_names=label_names,
            test_path=files.get("test"),
            test_fraction=float(fraction),
            name=name,
        )
        data = lazy.load()
        if len(data.test) == 0:
            raise _fail(
                path,
                f"no test examples ('test_fraction' {fraction} of "
                f"{len(data.train)} rounds to 0); fix: add a 'test' file or more rows",
            )
        source = f"{path}: {', '.join(str(f) for f in files.values())}"
    task = Task(
        name=name,
        text_fields=text_columns,
        label_names=label_names,
        label_words=label_words,
        template=template,
        loader=lambda: data,
        source=source,
        needs_hub="hub" in spec,
    )
    if k is not None:
        _check_k(path, task, data, k, held_out="hub" not in spec and "test" not in spec)
    return task


def _check_k(path: Path, task: Task, data: TaskData, k: int, *, held_out: bool) -> None:
    counts = Counter(int(c) for c in data.train.labels)
    short = [(task.label_names[c], counts[c]) for c in range(task.num_labels) if counts[c] < 2 * k]
    if short:
        name, n = short[0]
        note = " after the 'test_fraction' hold-out" if held_out else ""
        raise _fail(
            path,
            f"class {name!r} has {n} training examples{note}, but k={k} needs {2 * k} per class "
            f"({k} train + {k} dev); fix: add examples of that class to 'train', or use "
            f"k <= {min(counts[c] for c in range(task.num_labels)) // 2}",
        )


def resolve_tasks(
    names: Sequence[str], task_files: Sequence[str | os.PathLike] = (), *, k: int | None = None
) -> dict[str, Task]:
    """Registered tasks and task-file tasks by the name that results and reports use.

    Args:
      names: registered task names (`get_task`).
      task_files: task files (`load_task_file`), each read and checked now.
      k: examples per class, checked against each task file's data.

    Returns:
      ``{name: task}``, registered tasks first, in the order given.

    Raises:
      UnknownTaskError: an unknown registered name.
      TaskFileError: a bad task file, or two tasks of one name.
    """
    out: dict[str, Task] = {}
    for name in names:
        out[name] = get_task(name)
    for path in task_files:
        task = load_task_file(path, k=k)
        if task.name in out:
            raise _fail(
                Path(path),
                f"a task named {task.name!r} is already in this run; fix: "
                "set a distinct 'name' in the task file",
            )
        out[task.name] = task
    return out


def task_file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a task file and of the data files it names (hex).

    A run records it, so that resuming after the task file or its data changed is refused
    instead of mixing results of two datasets. For ``hub`` tasks only the task file counts.
    """
    path = Path(path)
    h = hashlib.sha256(path.read_bytes())
    spec = _read_spec(path)
    for key in ("train", "test"):
        if isinstance(spec.get(key), str) and (path.parent / spec[key]).is_file():
            h.update((path.parent / spec[key]).read_bytes())
    return h.hexdigest()
