"""What is trained: LoRA adapters, all weights, or only the head; the trainable/frozen split.

``make_model_fn`` wraps an ``output_fn`` (:mod:`lora_jax.readout`) into the
``model_fn(trainable, frozen, batch, dropout_rng)`` that :mod:`lora_jax.train` optimizes and
:mod:`ntk` linearizes; ``split_params`` gives the matching initial ``(trainable, frozen)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
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
    ``frozen`` the rest. A ``label_word_ids=`` keyword is passed on to ``output_fn`` (one made
    with ``label_words_at_call=True``; see :func:`label_words_as_inputs`).
    """
    method = Method(method)
    if method == Method.LORA:
        if lora_config is None:
            raise ConfigError("method='lora' needs a lora_config.")

        def model_fn(trainable, frozen, batch, dropout_rng, **words):
            dropout = dropout_rng is not None
            merged = lora.apply(frozen, trainable, lora_config, fusion=fusion, dropout=dropout)
            return output_fn(merged, batch, dropout_rng, **words)

    elif method == Method.FULL:

        def model_fn(trainable, frozen, batch, dropout_rng, **words):
            del frozen
            return output_fn(trainable, batch, dropout_rng, **words)

    else:

        def model_fn(trainable, frozen, batch, dropout_rng, **words):
            return output_fn(params_lib.combine(trainable, frozen), batch, dropout_rng, **words)

    return Declared(model_fn, capabilities_of(output_fn))


def label_words_as_inputs(model_fn: Callable) -> Declared:
    """Wraps a ``model_fn`` whose output function takes its label words per call
    (``readout.make_output_fn(..., label_words_at_call=True)``), so that the ids arrive as an
    argument of the compiled programs instead of constants baked into them.

    Returns ``fn(trainable, (frozen, (label_word_ids, inputs)), batch, dropout_rng)`` calling
    ``model_fn(trainable, frozen, batch, dropout_rng, label_word_ids=label_word_ids)``, or with
    ``(frozen, inputs)`` as its frozen argument when ``inputs`` is not None (e.g. the member
    factors of ``lora.with_member_factors``). ``label_word_ids`` is ``[K]``. In a job
    (``train.fit_job``) pass ``member_inputs=(ids [n, K], inputs or None)``: each member reads
    its own task's label words, so cells of different tasks with one K share a job and every
    task with the same shapes shares one compiled program; for one run (``train.fit``) pass
    ``frozen=(frozen, (ids, None))``. It keeps ``model_fn`` 's capabilities except
    ``embedding_rows``, which now depend on the call.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.trainable import label_words_as_inputs
      >>> def model_fn(trainable, frozen, batch, dropout_rng, label_word_ids):
      ...     return batch["x"][:, label_word_ids]  # stands in for logits at the label words
      >>> fn = label_words_as_inputs(model_fn)
      >>> fn({}, ({}, (jnp.array([2, 0]), None)), {"x": jnp.arange(3.0)[None]}, None).tolist()
      [[2.0, 0.0]]
    """

    def fn(trainable, frozen, batch, dropout_rng):
        base, (label_word_ids, inputs) = frozen
        inner = base if inputs is None else (base, inputs)
        return model_fn(trainable, inner, batch, dropout_rng, label_word_ids=label_word_ids)

    return Declared(fn, capabilities_of(model_fn)._replace(embedding_rows=None))


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
