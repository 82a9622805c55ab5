"""What the cells of one experiment share: the tokenizer, loaded models, encoded data, programs.

Loading and encoding happen once per run and per (task, seed); model functions are built once
per (task, method, rank), so the compiled training programs are reused across seeds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from experiments.config import ExperimentConfig
from lora_jax import models, tasks
from lora_jax.errors import ConfigError
from lora_jax.models.pretrained import read_encoder_config, resolve, weights_file
from lora_jax.pooling import Pooling, PoolingSpec, detect_pooling, make_pooled_feature_fns
from lora_jax.readout import Readout, load_prompt_encoder, make_output_fn
from lora_jax.rows import map_rows_fn

PyTree = Any


class TaskData(NamedTuple):
    """Encoded splits of one task and seed: dicts of ``[N, ...]`` device arrays."""

    train: dict
    dev: dict
    test: dict


def resolve_model(name: str) -> str:
    """``minilm`` names the embedded MiniLM-L6; anything else is a path or a hub id."""
    return models.minilm_path() if name == "minilm" else name


def check_model(cfg: ExperimentConfig) -> None:
    """Fails fast on a ``--model`` that cannot run ``cfg``, before a run directory is made.

    Checks that ``cfg.model`` is a model directory (or hub id) with a tokenizer, a config.json
    this library runs and a weight file (not read here), and that ``--max-length`` fits the
    model's position table.

    Raises:
      MissingFileError: no such directory or hub id, or no config.json or weight file in it.
      InputFileError: no usable tokenizer, or a config.json of an unsupported model
        (``CheckpointError``).
      ConfigError: ``cfg.max_length`` exceeds the model's positions.
    """
    path = resolve(resolve_model(cfg.model))
    models.load_tokenizer(path)
    limit = read_encoder_config(path).max_tokens
    weights_file(path)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(
            f"--max-length {cfg.max_length} exceeds {cfg.model}'s {limit} positions; use "
            f"--max-length {limit} or less."
        )


class _NewHeadFilter(logging.Filter):
    """Drops `models.from_pretrained` 's "Newly initialized" warning when only the new head is
    new: the classifier (and DeBERTa's ContextPooler, ``pooler.*``), which the head-only
    baseline creates on purpose and trains. A new encoder weight (e.g. a BERT pooler missing
    from the checkpoint, ``bert.pooler.*``) is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        new = getattr(record, "newly_initialized", ())
        return not (new and all(p.startswith(("classifier.", "pooler.")) for p in new))


@contextlib.contextmanager
def _quiet_new_head():
    logger = logging.getLogger(models.from_pretrained.__module__)
    quiet = _NewHeadFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Workbench:
    """Caches for one experiment (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, named_tasks: dict[str, tasks.Task] | None = None):
        self.cfg = cfg
        self.named_tasks = named_tasks or {}  # e.g. from task files; others: tasks.get_task
        self.path = resolve_model(cfg.model)
        self.tokenizer = models.load_tokenizer(self.path)
        self._cache: dict[tuple, Any] = {}

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- models -------------------------------------------------------------------------------

    def _prompt_encoder(self) -> tuple[Callable, PyTree, Readout]:
        def build():
            # auto: the MLM head, else an ELECTRA discriminator (rtd), else tied_mean (MiniLM).
            model, readout = load_prompt_encoder(self.path, self.cfg.readout, dtype=self.cfg.dtype)
            apply_fn, params = models.split(model)
            if self.cfg.remat:
                apply_fn = functools.partial(apply_fn, remat=True)
            return apply_fn, params, readout

        return self.memo(("prompt_encoder",), build)

    @property
    def model_type(self) -> str:
        def build():
            with open(os.path.join(resolve(self.path), "config.json")) as f:
                return models.EncoderConfig.from_hf(json.load(f)).model_type

        return self.memo(("model_type",), build)

    @property
    def pooling(self) -> PoolingSpec:
        """The head-only baseline's features: ``cfg.pooling``, or detected for ``auto``."""

        def build():
            if self.cfg.pooling == "auto":
                return detect_pooling(resolve(self.path))
            return PoolingSpec(Pooling(self.cfg.pooling))

        return self.memo(("pooling",), build)

    @property
    def readout(self) -> Readout:
        """The readout prompt models use (``auto`` resolved for this checkpoint)."""
        return self._prompt_encoder()[2]

    @property
    def prompt_head(self) -> str | None:
        """The ``from_pretrained`` head of prompt models: ``'mlm'`` or None (tied readouts)."""
        return "mlm" if self.readout == Readout.MLM else None

    def label_word_ids(self, task: str) -> list[int]:
        """The K vocabulary ids of ``task``'s label words."""
        return self.memo(
            ("label_word_ids", task),
            lambda: tasks.label_word_ids(self.tokenizer, self.task(task), self.word_style),
        )

    def prompt_model(self, task: str) -> tuple[Callable, PyTree]:
        """``(output_fn, params)`` of prompt-based classification for ``task``."""
        apply_fn, params, readout = self._prompt_encoder()

        def build():
            return make_output_fn(apply_fn, readout, self.label_word_ids(task))

        return self.memo(("prompt", task), build), params

    def prompt_model_at_call(self) -> tuple[Callable, PyTree]:
        """``(output_fn, params)`` of prompt-based classification for every task: the output
        function takes the label words per call (``make_output_fn(..., label_words_at_call=
        True)``), so that the training and evaluation programs take them as an argument and
        tasks of one shape share them. The same outputs as :meth:`prompt_model` 's with the
        task's :meth:`label_word_ids`."""
        apply_fn, params, readout = self._prompt_encoder()

        def build():
            return make_output_fn(apply_fn, readout, label_words_at_call=True)

        return self.memo(("prompt_at_call",), build), params

    def cls_head_model(self, task: str, seed: int) -> tuple[Callable, PyTree, TaskData]:
        """``(output_fn, params, data)`` for training only a new classification head.

        The head (initialized from ``seed``) is trained on the frozen encoder's features,
        pooled as the checkpoint was trained (:attr:`pooling`) and computed once
        (``lora_jax.pooling.make_pooled_feature_fns``): the same outputs as running the encoder
        every step, as the encoder runs no dropout. ``data`` holds ``features`` [N, H]
        and ``labels``; the test split's features are the same for every seed and computed once.
        """
        num_labels = self.task(task).num_labels
        with _quiet_new_head():  # the new classifier is the point of this baseline
            model = models.from_pretrained(
                self.path, head="cls", num_labels=num_labels, seed=seed, dtype=self.cfg.dtype
            )
        _, params = models.split(model)
        # One program per task, reused across seeds (the seed only changes the head's weights).
        feature_fn, output_fn = self.memo(
            ("cls_fns", task), lambda: make_pooled_feature_fns(model.config, self.pooling)
        )
        features = self.memo(("cls_features", task), lambda: map_rows_fn(feature_fn, 64))

        def featurize(split: dict) -> dict:
            return {"features": features(params, split), "labels": split["labels"]}

        raw = self.data(task, seed, mode="cls")
        test = self.memo(("cls_test_features", task), lambda: featurize(raw.test))
        return output_fn, params, TaskData(featurize(raw.train), featurize(raw.dev), test)

    def predict(self, task: str) -> Callable:
        """``predict(params, {}, data) -> [N, K]`` (``train.evaluate`` 's interface) of ``task`` 's
        untrained prompt model, compiled once."""
        output_fn, _ = self.prompt_model(task)
        fn = self.memo(("predict", task), lambda: map_rows_fn(output_fn, 64))
        return lambda params, frozen, data: fn(params, data)

    # -- data ---------------------------------------------------------------------------------

    def job_shape(self, task: str) -> tuple[int, ...]:
        """What two tasks' LoRA cells must share to be members of one job: K, and the number
        of rows and the padded length of the train and dev splits a job of all the task's
        seeds (``cfg.seeds``) trains on (:meth:`job_data`)."""

        def build():
            datas = self.job_data(task, list(self.cfg.seeds), mode="prompt")
            shapes = (datas[0].train["input_ids"].shape, datas[0].dev["input_ids"].shape)
            return (self.task(task).num_labels, *shapes[0], *shapes[1])

        return self.memo(("job_shape", task), build)

    @property
    def word_style(self) -> str:
        return tasks.word_style_for(self.model_type)

    def task(self, name: str) -> tasks.Task:
        return self.named_tasks.get(name) or self.memo(("task", name), lambda: tasks.get_task(name))

    def data(self, task: str, seed: int, mode: str) -> TaskData:
        """Encoded k-shot train/dev (sampled with ``seed``) and the capped test set.

        Rows are truncated at ``cfg.max_length`` and each split is padded only to its own
        longest row (rounded up to a multiple of 8): the padding is masked, so the outputs are
        those at T = ``max_length``, for fewer tokens (TREC's questions need at most 40).
        """

        def encode(examples):
            arrays = tasks.encode(
                examples,
                self.tokenizer,
                self.task(task),
                max_length=self.cfg.max_length,
                mode=mode,
                word_style=self.word_style,
                pad_to="longest",
            )
            return {name: jnp.asarray(array) for name, array in arrays.items()}

        def build():
            splits = tasks.few_shot_splits(
                self.task(task), k=self.cfg.k, seed=seed, test_cap=self.cfg.test_cap or None
            )
            test = self.memo(("test", task, mode), lambda: encode(splits.test))
            return TaskData(encode(splits.train), encode(splits.dev), test)

        return self.memo(("data", task, seed, mode), build)

    def job_data(self, task: str, seeds: list[int], mode: str) -> list[TaskData]:
        """:meth:`data` of each seed, its train and dev splits padded to the longest of all
        seeds' (``lora_jax.tasks.pad_length``), so that the members of one vectorized job can
        be stacked. The test split is the seeds' shared one."""
        return self.cells_data([(task, seed) for seed in seeds], mode)

    def cells_data(self, cells: list[tuple[str, int]], mode: str) -> list[TaskData]:
        """:meth:`data` of each ``(task, seed)``, train and dev padded to the longest of all
        (as :meth:`job_data`, across tasks too); each task's test split is its own one (the
        same dict for all its seeds)."""
        datas = [self.data(task, seed, mode) for task, seed in cells]
        width = {
            split: max(getattr(d, split)["input_ids"].shape[1] for d in datas)
            for split in ("train", "dev")
        }
        pad_id = self.tokenizer.pad_token_id

        def padded(split: dict, length: int) -> dict:
            if split["input_ids"].shape[1] == length:
                return split
            return {k: jnp.asarray(v) for k, v in tasks.pad_length(split, length, pad_id).items()}

        return [
            TaskData(padded(d.train, width["train"]), padded(d.dev, width["dev"]), d.test)
            for d in datas
        ]
