"""From an encoder to the K outputs of a few-shot task, and to a trainable/frozen split.

``make_output_fn`` turns a model's pure ``apply_fn`` into ``output_fn(params, batch) -> [B, K]``:
the label-word logits at ``<mask>`` (prompt-based fine-tuning, LM-BFF), or class logits from a
classification head. ``make_model_fn`` then chooses what is trained (LoRA adapters, all
weights, or only the head) and returns the ``model_fn(trainable, frozen, batch, dropout_rng)``
that :mod:`lora_jax.train` optimizes and :mod:`ntk` linearizes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import lora
from lora_jax import params as params_lib
from lora_jax.models import EncoderConfig, cls_head, forward

PyTree = Any
OutputFn = Callable[..., jax.Array]

HEAD_PATTERN = r"^classifier\."  # the sequence-classification head (RoBERTa and BERT names)
WORD_EMBEDDING_PATTERN = r"embeddings\.word_embeddings\.embedding$"


class Readout(enum.StrEnum):
    """How the K outputs are read from the encoder.

    MLM: masked-LM head logits of the K label words at ``<mask>`` (needs an MLM head).
    TIED: dot product of the final hidden state at ``<mask>`` with the K label words' input
      embeddings: an MLM decoder without the transform, for encoders shipped without an MLM
      head.
    TIED_MEAN: as TIED, but reading the mean of the final hidden states over the real tokens
      of the prompt: the sentence embedding that sentence-embedding encoders (e.g. the embedded
      MiniLM, trained with mean pooling) carry their information in.
    CLS: a sequence-classification head on the sentence (no template).
    """

    MLM = "mlm"
    TIED = "tied"
    TIED_MEAN = "tied_mean"
    CLS = "cls"


class Method(enum.StrEnum):
    """What is trained: LoRA adapters, all weights, or only the classification head."""

    LORA = "lora"
    FULL = "full"
    HEAD = "head"


def word_embeddings(params: Mapping) -> jax.Array:
    """The input word-embedding matrix ``[V, H]`` of an encoder's params."""
    flat = params_lib.flatten(params)
    (path,) = params_lib.select(params, WORD_EMBEDDING_PATTERN)
    return flat[path]


def make_output_fn(
    apply_fn: Callable, readout: Readout | str, label_word_ids: jax.Array | None = None
) -> OutputFn:
    """Returns ``output_fn(params, batch, dropout_rng=None) -> [B, K]``.

    Args:
      apply_fn: a model's pure function (``lora_jax.models.split``), with the head that
        ``readout`` needs: ``mlm`` for MLM, None (hidden states) for TIED and TIED_MEAN,
        ``cls`` for CLS.
      readout: see :class:`Readout`.
      label_word_ids: ``[K]`` vocabulary ids of the label words (MLM and TIED).

    The batch is a dict with ``input_ids`` [B, T], ``attention_mask`` [B, T], optionally
    ``token_type_ids`` [B, T], and ``mask_pos`` [B] (the ``<mask>`` position; prompt modes).
    """
    readout = Readout(readout)
    if readout != Readout.CLS and label_word_ids is None:
        raise ValueError(f"readout={readout.value!r} needs label_word_ids (the K label words).")
    ids = None if label_word_ids is None else jnp.asarray(label_word_ids, jnp.int32)

    def output_fn(params, batch, dropout_rng=None):
        inputs = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        if readout == Readout.CLS:
            return apply_fn(params, *inputs, dropout_rng=dropout_rng)
        if readout == Readout.MLM:
            return apply_fn(
                params,
                *inputs,
                mask_positions=batch["mask_pos"],
                label_word_ids=ids,
                dropout_rng=dropout_rng,
            )
        if readout == Readout.TIED:
            hidden = apply_fn(
                params, *inputs, mask_positions=batch["mask_pos"], dropout_rng=dropout_rng
            )  # (B, H)
        else:
            states = apply_fn(params, *inputs, dropout_rng=dropout_rng)  # (B, T, H)
            mask = batch["attention_mask"][..., None].astype(states.dtype)  # (B, T, 1)
            hidden = states.sum(1, where=mask > 0) / mask.sum(1)  # (B, H)
        return hidden @ word_embeddings(params)[ids].T.astype(hidden.dtype)  # (B, K)

    return output_fn


def make_cls_feature_fns(config: EncoderConfig) -> tuple[Callable, OutputFn]:
    """The CLS readout split into a frozen part and the head, to train a head on cached features.

    Returns ``(feature_fn, head_output_fn)``: ``feature_fn(params, batch) -> [B, H]`` is the
    encoder's final hidden state at ``<s>`` / ``[CLS]`` (only that position is computed in the
    last layer), and ``head_output_fn(params, batch, dropout_rng=None) -> [B, K]`` applies the
    classification head to ``batch['features']``. For head-only training without dropout (the
    encoder frozen), ``head_output_fn`` on ``feature_fn`` 's outputs equals
    ``make_output_fn(apply_fn, 'cls')``: the features are computed once instead of every step.
    """

    def feature_fn(params, batch):
        ids = batch["input_ids"]
        return forward(
            params,
            ids,
            batch["attention_mask"],
            batch.get("token_type_ids"),
            config=config,
            head=None,
            mask_positions=jnp.zeros(ids.shape[:1], jnp.int32),
        )

    def head_output_fn(params, batch, dropout_rng=None):
        return cls_head(params, batch["features"], config=config, dropout_rng=dropout_rng)

    return feature_fn, head_output_fn


_LORA_RNG = 0x10AA  # fold_in tag of the LoRA-dropout key


def make_model_fn(
    output_fn: OutputFn,
    method: Method | str,
    *,
    lora_config: lora.LoraConfig | None = None,
    fused: bool | None = None,
) -> Callable:
    """Returns ``model_fn(trainable, frozen, batch, dropout_rng) -> [B, K]`` for ``method``.

    LORA: ``trainable`` is the adapters pytree, ``frozen`` the base params, applied as
    ``lora.apply(..., fused=fused)``: None (default) picks per module the path that is faster
    for a training step at its shapes (fused where ``3 r (in + out) < in * out``, see
    ``lora.apply``), True fuses every module (what a vectorized sweep needs, so that the base
    GEMMs are shared across members), False merges every kernel. With a ``dropout_rng``,
    ``lora_config.dropout`` runs on the LoRA branches (its key is
    ``fold_in(dropout_rng, 0x10AA)``, so the model's own dropout masks are the same with or
    without it). FULL: ``trainable`` is all params. HEAD: ``trainable`` is the
    ``classifier`` sub-tree and ``frozen`` the rest.
    """
    method = Method(method)
    if method == Method.LORA:
        if lora_config is None:
            raise ValueError("method='lora' needs a lora_config.")

        def model_fn(trainable, frozen, batch, dropout_rng):
            lora_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, _LORA_RNG)
            merged = lora.apply(frozen, trainable, lora_config, fused=fused, dropout_rng=lora_rng)
            return output_fn(merged, batch, dropout_rng)

    elif method == Method.FULL:

        def model_fn(trainable, frozen, batch, dropout_rng):
            del frozen
            return output_fn(trainable, batch, dropout_rng)

    else:

        def model_fn(trainable, frozen, batch, dropout_rng):
            return output_fn(params_lib.combine(trainable, frozen), batch, dropout_rng)

    return model_fn


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
            raise ValueError("method='lora' needs a PRNG key and a lora_config.")
        return lora.init(key, params, lora_config), params
    if method == Method.FULL:
        return params, {}
    return params_lib.partition(params, HEAD_PATTERN)
