"""Tasks from local CSV / JSON-lines files."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.tasks.registry import read_jsonl
from lora_jax.tasks.task import Examples, Task, TaskData

LOCAL_TEST_SEED = 0


def _label_index(value: Any, label_names: tuple[str, ...], where: str) -> int:
    """Maps a raw label (a label name, an index, an index string, a bool) to its index."""
    if isinstance(value, str) and value in label_names:
        return label_names.index(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 <= value < len(label_names):  # bools too: False=0, True=1
        return int(value)
    raise ConfigError(
        f"{where}: label {value!r} is neither one of label_names {label_names} nor a class index "
        f"in [0, {len(label_names)}); pass label_names=... matching the file's label values"
    )


def _examples(
    rows: Sequence[dict[str, Any]],
    text_columns: tuple[str, ...],
    label_column: str,
    label_names: tuple[str, ...],
    where: str,
) -> Examples:
    if rows:
        missing = [c for c in (*text_columns, label_column) if c not in rows[0]]
        if missing:
            raise ConfigError(f"{where}: columns {missing} not found; columns: {list(rows[0])}")
    return Examples(
        texts=tuple(tuple(str(r[c]) for r in rows) for c in text_columns),
        labels=np.array(
            [_label_index(r[label_column], label_names, where) for r in rows], dtype=np.int32
        ),
    )


_Reader = Callable[[str | os.PathLike], Sequence[dict[str, Any]]]


def _file_task(
    reader: _Reader, public_name: str = "file_task", doc: str | None = None
) -> Callable[..., Task]:
    """A task maker over files read by ``reader`` (a path -> its rows, as dicts).

    The one implementation behind `csv_task` and `jsonl_task` (and task files); the maker it
    returns takes `csv_task`'s arguments and is named ``public_name`` with docstring ``doc``.
    """

    def make(
        path: str | os.PathLike,
        *,
        text_columns: Sequence[str],
        label_column: str,
        label_words: Sequence[str],
        template: str,
        label_names: Sequence[str] | None = None,
        test_path: str | os.PathLike | None = None,
        test_fraction: float = 0.2,
        name: str | None = None,
    ) -> Task:
        text_columns = tuple(text_columns)
        names = (
            tuple(label_names)
            if label_names is not None
            else tuple(map(str, range(len(label_words))))
        )
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")

        def load() -> TaskData:
            train = _examples(reader(path), text_columns, label_column, names, str(path))
            if test_path is not None:
                test = _examples(
                    reader(test_path), text_columns, label_column, names, str(test_path)
                )
                return TaskData(train=train, test=test)
            # No test file: hold out a fixed fraction (same split on every call and machine).
            perm = np.random.default_rng(LOCAL_TEST_SEED).permutation(len(train))
            n_test = int(round(test_fraction * len(train)))
            return TaskData(
                train=train.select(np.sort(perm[n_test:])),
                test=train.select(np.sort(perm[:n_test])),
            )

        return Task(
            name=name or Path(path).stem,
            text_fields=text_columns,
            label_names=names,
            label_words=tuple(label_words),
            template=template,
            loader=load,
            source=str(path),
        )

    make.__name__ = make.__qualname__ = public_name
    make.__doc__ = doc
    return make


def _read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


csv_task = _file_task(
    _read_csv,
    "csv_task",
    """Makes a task from a CSV file with a header row.

    Args:
      path: CSV file of training examples.
      text_columns: one or two column names holding the texts, in template order.
      label_column: the column holding labels: a label name (from ``label_names``) or a class
        index ``0..K-1``.
      label_words: the K bare verbalizer words, e.g. ``('terrible', 'great')``.
      template: prompt template, e.g. ``'{0} It was {mask} .'`` (see `lora_jax.tasks.task`).
      label_names: the K class names in index order; default ``('0', ..., 'K-1')``.
      test_path: a CSV file with the test examples; without it a fixed ``test_fraction`` of
        ``path`` is held out (``numpy.random.default_rng(0)``).
      test_fraction: fraction held out as test when ``test_path`` is None.
      name: task name; default the file name without extension.

    Returns:
      A `Task`; the file is read when ``task.load()`` is called.
    """,
)

jsonl_task = _file_task(
    read_jsonl,
    "jsonl_task",
    """Makes a task from a JSON-lines file (``.jsonl`` or ``.jsonl.gz``); see `csv_task`.

    The arguments are `csv_task`'s; ``path`` and ``test_path`` are JSON-lines files, one object
    per line. Labels may also be booleans (False -> 0, True -> 1).
    """,
)
