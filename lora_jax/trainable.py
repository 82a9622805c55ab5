"""What is trained: LoRA adapters, all weights, or only the head; the trainable/frozen split.

``make_model_fn`` wraps an ``output_fn`` (:mod:`lora_jax.readout`) into the
``model_fn(trainable, frozen, batch, dropout_rng)`` that :mod:`lora_jax.train` optimizes and
:mod:`ntk` linearizes; ``split_params`` gives the matching initial ``(trainable, frozen)``.
"""

from __future__ import annotations

import enum
from typing import Any

import jax

from lora_jax import lora
from lora_jax import params as params_lib
from lora_jax.capabilities import Declared, capabilities_of
from lora_jax.errors import ConfigError
from lora_jax.readout import OutputFn

PyTree = Any

# The sequence-classification head: `classifier` (all models), and DeBERTa's ContextPooler,
# top-level `pooler` (new weights, unlike BERT's pretrained `bert.pooler`).
HEAD_PATTERN = r"^(classifier|pooler)\."


class Method(enum.StrEnum):
    """What is trained: LoRA adapters, all weights, or only the classification head."""

    LORA = "lora"
    FULL = "full"
    HEAD = "head"


def make_model_fn(
    output_fn: OutputFn,
    method: Method | str,
    *,
    lora_config: lora.LoraConfig | None = None,
    fusion: lora.Fusion | str = lora.Fusion.AUTO,
) -> Declared:
    """Returns ``model_fn(trainable, frozen, batch, dropout_rng) -> [B, K]`` for ``method``, with
    ``output_fn`` 's capabilities (:mod:`lora_jax.capabilities`).

    LORA: ``trainable`` is the adapters pytree, ``frozen`` the base params, applied as
    ``lora.apply(..., fusion=fusion)`` (:class:`lora_jax.lora.Fusion`): ``auto`` (default) picks
    per module the path that is faster for a training step at its shapes, ``fused`` fuses every
    module (what a job of several members needs, so that the base GEMMs are shared across
    members), ``merged`` merges every kernel. With a ``dropout_rng``,
    ``lora_config.dropout`` runs on the LoRA branches; the encoder draws their masks from a key
    stream of their own, so the model's own dropout masks are the same with or without it.
    FULL: ``trainable`` is all params. HEAD: ``trainable`` is the ``classifier`` sub-tree and
    ``frozen`` the rest.
    """
    method = Method(method)
    if method == Method.LORA:
        if lora_config is None:
            raise ConfigError("method='lora' needs a lora_config.")

        def model_fn(trainable, frozen, batch, dropout_rng):
            dropout = dropout_rng is not None
            merged = lora.apply(frozen, trainable, lora_config, fusion=fusion, dropout=dropout)
            return output_fn(merged, batch, dropout_rng)

    elif method == Method.FULL:

        def model_fn(trainable, frozen, batch, dropout_rng):
            del frozen
            return output_fn(trainable, batch, dropout_rng)

    else:

        def model_fn(trainable, frozen, batch, dropout_rng):
            return output_fn(params_lib.combine(trainable, frozen), batch, dropout_rng)

    return Declared(model_fn, capabilities_of(output_fn))


def split_params(
    params: PyTree,
    method: Method | str,
    *,
    key: jax.Array | None = None,
    lora_config: lora.LoraConfig | None = None,
) -> tuple[PyTree, PyTree]:
    """Initial ``(trainable, frozen)`` for ``method`` (LORA initializes adapters with ``key``)."""
    method = Method(method)
    if method == Method.LORA:
        if key is None or lora_config is None:
            raise ConfigError("method='lora' needs a PRNG key and a lora_config.")
        return lora.init(key, params, lora_config), params
    if method == Method.FULL:
        return params, {}
    return params_lib.partition(params, HEAD_PATTERN)
