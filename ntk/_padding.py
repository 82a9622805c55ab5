"""Trailing padding cut from kernel blocks: the same kernel from shorter sequences.

An encoder that gives masked keys exactly zero attention weight (this library's:
``lora_jax.models.layers.attend``) computes the same outputs for a row whatever trailing
padding follows it, and the padded positions get exactly zero derivative. So a kernel block
may be computed on its rows cut to the longest of them (rounded up to ``LENGTH_MULTIPLE``, to
bound the number of compiled shapes), and rows sorted by length first make the blocks of a
large kernel short: a 1,000-row MR test set padded to 64 tokens has a median length of 31.

Only functions whose :class:`ntk.ModelInfo` says so are cut (``ignores_padding``, set by
:func:`ntk.kernel_model` / :func:`ntk.lora_kernel_model` from the ``ignores_padding`` flag of
:func:`lora_jax.readout.make_output_fn` for this library's encoders); the batch must hold an
``attention_mask`` ``[N, T]`` and its token-level arrays are the ``[N, T]`` leaves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lora_jax.rows import token_lengths

PyTree = Any

__all__ = ["LENGTH_MULTIPLE", "cut", "cuts", "lengths", "sort_by_length"]

LENGTH_MULTIPLE = 8


def cuts(ignores_padding: bool, x: PyTree) -> bool:
    """Whether blocks of ``x`` are cut: the model ignores padding (:class:`ntk.ModelInfo`) and
    ``x`` is a batch dict with an ``attention_mask`` ``[N, T]``."""
    return ignores_padding and isinstance(x, dict) and np.ndim(x.get("attention_mask")) == 2


def lengths(x: dict) -> np.ndarray:
    """``[N]``: each row's length up to its last real token (1 for an all-padding row)."""
    return np.maximum(token_lengths(x["attention_mask"]), 1)


def cut(x: dict, skip_prefix: str = "") -> dict:
    """``x`` with its ``[N, T]`` leaves cut to the rows' longest length (rounded up to
    ``LENGTH_MULTIPLE``, at most T); keys starting with ``skip_prefix`` are left whole."""
    t = np.shape(x["attention_mask"])[1]
    keep = min(t, -(-int(lengths(x).max()) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    if keep == t:
        return x

    def one(key, a):
        skipped = bool(skip_prefix) and key.startswith(skip_prefix)
        token_level = np.ndim(a) == 2 and np.shape(a)[1] == t and not skipped
        return a[:, :keep] if token_level else a

    return {key: one(key, a) for key, a in x.items()}


def sort_by_length(x: dict) -> tuple[np.ndarray, dict]:
    """``(order, x[order])``: rows sorted by length, shortest first (a stable sort)."""
    order = np.argsort(lengths(x), kind="stable")
    return order, {key: np.asarray(a)[order] if np.ndim(a) >= 1 else a for key, a in x.items()}
