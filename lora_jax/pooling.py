"""Sentence features for a head-only baseline, pooled the way the checkpoint was trained.

A linear probe is only as good as the features it reads. BERT's ``pooler`` (dense + tanh on
``[CLS]``) is trained by next-sentence prediction in BERT itself, but a sentence-transformers
checkpoint (such as the embedded MiniLM-L6) was trained on the *mean* of its token states, and
its pooler was never trained for anything: a head on the pooler then scores below zero-shot.
:func:`detect_pooling` reads which one a checkpoint was trained with, and
:func:`make_pooled_feature_fns` computes those features once (the encoder is frozen) and
returns the head that trains on them.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.errors import ConfigError
from lora_jax.models import EncoderConfig, cls_head, forward
from lora_jax.models.layers import dense, dropout

__all__ = ["Pooling", "PoolingSpec", "detect_pooling", "make_pooled_feature_fns", "mean_pool"]

PyTree = Any


class Pooling(enum.StrEnum):
    """What the head reads.

    POOLER: the checkpoint's own sequence-classification path on ``[CLS]`` / ``<s>``: BERT's
      pooler (frozen) then the classifier; RoBERTa's head (dense, tanh, out_proj). Right where
      the pooler was trained (BERT, RoBERTa).
    CLS: the final hidden state at ``[CLS]`` / ``<s>``, no pooler (for checkpoints trained with
      CLS pooling, e.g. sentence-transformers ``pooling_mode_cls_token``).
    MEAN: the mean of the final hidden states over the real tokens (sentence-transformers
      ``pooling_mode_mean_tokens``, e.g. the embedded MiniLM-L6).
    """

    POOLER = "pooler"
    CLS = "cls"
    MEAN = "mean"


class PoolingSpec(NamedTuple):
    """A pooling, and whether the features are then L2-normalized (a ``Normalize`` module)."""

    pooling: Pooling
    normalize: bool = False


def detect_pooling(directory: str | os.PathLike) -> PoolingSpec:
    """The pooling a model directory was trained with.

    A sentence-transformers directory (``modules.json`` listing a ``Pooling`` module) gives its
    pooling mode, and ``normalize`` when a ``Normalize`` module follows; any other checkpoint
    gives POOLER (HF's sequence-classification path).

    Raises:
      ConfigError: a sentence-transformers pooling mode other than mean or CLS (max, ...).
    """
    directory = Path(directory)
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return PoolingSpec(Pooling.POOLER)
    with open(modules_path) as f:
        modules = json.load(f)
    types = [m.get("type", "") for m in modules]
    pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling is None:
        return PoolingSpec(Pooling.POOLER)
    with open(directory / pooling.get("path", "") / "config.json") as f:
        modes = {k for k, v in json.load(f).items() if k.startswith("pooling_mode_") and v}
    normalize = any(t.endswith(".Normalize") for t in types)
    if modes == {"pooling_mode_mean_tokens"}:
        return PoolingSpec(Pooling.MEAN, normalize)
    if modes == {"pooling_mode_cls_token"}:
        return PoolingSpec(Pooling.CLS, normalize)
    raise ConfigError(
        f"{directory} is a sentence-transformers model pooled with {sorted(modes)}, which the "
        "head-only baseline does not implement. Fix: choose a pooling explicitly (--pooling "
        "mean, cls or pooler)."
    )


def mean_pool(states: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``states`` [B, T, H] over the positions where ``attention_mask`` [B, T] is 1."""
    mask = attention_mask[..., None].astype(states.dtype)  # (B, T, 1)
    return (states * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)  # (B, H)


def make_pooled_feature_fns(
    config: EncoderConfig, spec: PoolingSpec | Pooling | str
) -> tuple[Callable, Callable]:
    """A frozen feature function and the head on its features, for head-only training.

    Returns ``(feature_fn, head_output_fn)``: ``feature_fn(params, batch) -> [B, H]`` pools
    the encoder's final hidden states as ``spec`` says; ``head_output_fn(params, batch,
    dropout_rng=None) -> [B, K]`` applies the trainable ``classifier`` to
    ``batch['features']``. POOLER reads ``[CLS]`` and applies the checkpoint's whole
    classification path (``lora_jax.models.cls_head``); CLS and MEAN apply the classifier
    directly (BERT's pooler and DeBERTa's ContextPooler are skipped; RoBERTa's and ELECTRA's
    heads have no pooler to skip).
    """
    if not isinstance(spec, PoolingSpec):
        spec = PoolingSpec(Pooling(spec))
    pooling, normalize = spec
    rate = (
        config.hidden_dropout_prob
        if config.classifier_dropout is None
        else config.classifier_dropout
    )

    def feature_fn(params, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        args = (params, ids, mask, batch.get("token_type_ids"))
        if pooling == Pooling.MEAN:
            features = mean_pool(forward(*args, config=config, head=None), mask)
        else:  # only position 0 is computed in the last layer
            first = jnp.zeros(ids.shape[:1], jnp.int32)
            features = forward(*args, config=config, head=None, mask_positions=first)
        if normalize:
            features = features / jnp.linalg.norm(features, axis=-1, keepdims=True).clip(1e-12)
        return features  # (B, H)

    def head_output_fn(params, batch, dropout_rng=None):
        features = batch["features"]
        if pooling == Pooling.POOLER or config.model_type in ("roberta", "electra"):
            return cls_head(params, features, config=config, dropout_rng=dropout_rng)
        return dense(params["classifier"], dropout(features, rate, dropout_rng))  # (B, K)

    return feature_fn, head_output_fn
