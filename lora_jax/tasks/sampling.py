"""k-shot sampling as in LM-BFF (Gao, Fisch, Chen, ACL 2021, arXiv:2012.15723).

For a seed s, k examples per class form the training set and another k per class the
development set, both drawn without overlap from the task's original training split; the test
set is the task's test split, optionally capped to a deterministic subsample that is the same
for every seed. Sampling uses ``numpy.random.default_rng(seed)`` only, so the splits do not
depend on the Python hash seed, the platform or the order tasks are loaded in.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.tasks.task import Examples, Task

SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)
TEST_CAP_SEED = 0  # the capped test subsample is the same for every few-shot seed


class FewShotSplits(NamedTuple):
    """The splits of one few-shot run.

    Attributes:
      train: k examples per class (N = k K), class-interleaved in random order.
      dev: another k per class, disjoint from ``train``.
      test: the task's test split (or its capped subsample), in file order.
      k: examples per class.
      seed: the sampling seed.
    """

    train: Examples
    dev: Examples
    test: Examples
    k: int
    seed: int


def sample_k_shot(
    labels: np.ndarray,
    *,
    k: int,
    seed: int,
    num_labels: int,
    label_names: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draws k train and k dev indices per class, without overlap.

    Args:
      labels: (N,) class indices of the pool.
      k: examples per class for train and again for dev.
      seed: seed of ``numpy.random.default_rng``.
      num_labels: K.
      label_names: class names for error messages.

    Returns:
      ``(train_idx, dev_idx)``, each (k K,) int64 indices into ``labels``, shuffled.

    Raises:
      ValueError: if ``k < 1`` or a class has fewer than 2k examples.
    """
    if k < 1:
        raise ConfigError(f"k must be a positive number of examples per class, got {k}")
    labels = np.asarray(labels)
    names = label_names or tuple(str(c) for c in range(num_labels))
    counts = np.bincount(labels, minlength=num_labels)
    short = [f"{names[c]!r} has {counts[c]}" for c in range(num_labels) if counts[c] < 2 * k]
    if short:
        raise ConfigError(
            f"k={k} needs {2 * k} training examples per class ({k} train + {k} dev), but class "
            f"{', class '.join(short)}; use k <= {int(counts.min()) // 2}"
        )
    rng = np.random.default_rng(seed)
    train, dev = [], []
    for c in range(num_labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        train.append(members[:k])
        dev.append(members[k : 2 * k])
    train_idx = rng.permutation(np.concatenate(train))
    dev_idx = rng.permutation(np.concatenate(dev))
    return train_idx, dev_idx


def cap_indices(n: int, cap: int | None) -> np.ndarray:
    """Returns sorted indices of a deterministic subsample of ``min(n, cap)`` out of ``n``."""
    if cap is None or cap >= n:
        return np.arange(n)
    if cap < 1:
        raise ConfigError(f"test_cap must be a positive number of examples or None, got {cap}")
    return np.sort(np.random.default_rng(TEST_CAP_SEED).choice(n, size=cap, replace=False))


def few_shot_splits(task: Task, *, k: int, seed: int, test_cap: int | None = None) -> FewShotSplits:
    """Loads a task and samples its LM-BFF few-shot splits.

    Args:
      task: the task (e.g. ``get_task('mr')``).
      k: examples per class, for train and again for dev (16 in LM-BFF).
      seed: sampling seed; the standard ones are `SEEDS`.
      test_cap: at most this many test examples (a fixed random subsample, the same for every
        seed); None keeps the whole test split.

    Returns:
      `FewShotSplits` with ``len(train) == len(dev) == k * task.num_labels``.

    Raises:
      ValueError: if some class has fewer than 2k training examples (the message names it).

    Example:
      >>> from lora_jax.tasks import get_task, few_shot_splits
      >>> splits = few_shot_splits(get_task('mr'), k=16, seed=13, test_cap=1000)
      >>> len(splits.train), len(splits.dev), len(splits.test)
      (32, 32, 1000)
    """
    data = task.load()
    train_idx, dev_idx = sample_k_shot(
        data.train.labels,
        k=k,
        seed=seed,
        num_labels=task.num_labels,
        label_names=task.label_names,
    )
    return FewShotSplits(
        train=data.train.select(train_idx),
        dev=data.train.select(dev_idx),
        test=data.test.select(cap_indices(len(data.test), test_cap)),
        k=k,
        seed=seed,
    )
