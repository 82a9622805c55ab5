"""How the K outputs of a few-shot task are read from an encoder.

``make_output_fn`` turns a model's pure ``apply_fn`` into ``output_fn(params, batch) -> [B, K]``:
the label-word logits at ``<mask>`` (prompt-based fine-tuning, LM-BFF), or class logits from a
classification head (see :mod:`lora_jax.trainable` for what is trained).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import models
from lora_jax import params as params_lib
from lora_jax.capabilities import Capabilities, Declared
from lora_jax.errors import ConfigError
from lora_jax.models import EncoderConfig, cls_head, embed, forward

PyTree = Any
OutputFn = Callable[..., jax.Array]

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
    RTD: prompting a replaced-token-detection discriminator (ELECTRA; Xia et al. 2022): each
      of the K label words is placed at ``<mask>`` in turn and its score is minus the
      discriminator's "replaced" logit there, i.e. the logit of the word being original. K
      encoder passes per example; needs ``head='rtd'``.
    CLS: a sequence-classification head on the sentence (no template).

    References:
      Xia et al., "Prompting ELECTRA: Few-Shot Learning with Discriminative Pre-Trained
      Models", EMNLP 2022, arXiv:2205.15223.
    """

    MLM = "mlm"
    TIED = "tied"
    TIED_MEAN = "tied_mean"
    RTD = "rtd"
    CLS = "cls"


def _word_rows(params: Mapping, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of the word-embedding table, ``[K, H]`` (also of a compacted one)."""
    (path,) = params_lib.select(params, WORD_EMBEDDING_PATTERN)
    table = params
    for key in path.split(".")[:-1]:  # the table's dict: {'embedding': ..., maybe 'rows'}
        table = table[key]
    return embed(table, ids)


def load_prompt_encoder(
    path: Any, readout: Readout | str = "auto", **kwargs
) -> tuple[Any, Readout]:
    """Loads the model a prompt readout needs: ``(EncoderModel, Readout)``.

    ``readout='auto'`` takes the MLM head where the checkpoint has one, else an ELECTRA
    discriminator's replaced-token-detection head (RTD), else hidden states read out through the
    tied word embeddings (TIED_MEAN, e.g. MiniLM). Other readouts load the head they need and
    raise the loader's error when it is missing.

    Args:
      path: a model directory or hub id (``lora_jax.models.from_pretrained``).
      readout: ``'auto'`` or a :class:`Readout` other than CLS.
      **kwargs: passed to ``from_pretrained`` (``dtype``, ``adapter``, ...).

    Raises:
      MissingHeadError: the checkpoint lacks the head that an explicit ``readout`` needs.
      CheckpointError: any other problem with the checkpoint.
    """
    if readout != "auto":
        readout = Readout(readout)
        # The MLM, RTD and CLS readouts read the head of the same name; the others need none.
        head = models.Head(readout.value) if readout.value in set(models.Head) else None
        return models.from_pretrained(path, head=head, **kwargs), readout
    heads = [(models.Head.MLM, Readout.MLM)]
    if models.read_model_type(path) == "electra":
        heads.append((models.Head.RTD, Readout.RTD))
    for head, found in heads:
        try:
            return models.from_pretrained(path, head=head, **kwargs), found
        except models.MissingHeadError:  # any other checkpoint problem is raised
            pass
    return models.from_pretrained(path, head=None, **kwargs), Readout.TIED_MEAN


def make_output_fn(
    apply_fn: Callable,
    readout: Readout | str,
    label_word_ids: jax.Array | None = None,
    *,
    label_words_at_call: bool = False,
) -> Declared:
    """Returns ``output_fn(params, batch, dropout_rng=None) -> [B, K]`` with its capabilities.

    Args:
      apply_fn: a model's pure function (``lora_jax.models.split``), with the head that
        ``readout`` needs: ``mlm`` for MLM, None (hidden states) for TIED and TIED_MEAN,
        ``rtd`` for RTD, ``cls`` for CLS.
      readout: see :class:`Readout`.
      label_word_ids: ``[K]`` vocabulary ids of the label words (MLM, TIED, TIED_MEAN and RTD),
        fixed in the function: a compiled program that calls it holds them as constants, so
        each task compiles its own.
      label_words_at_call: instead of fixed ids, the function takes them per call:
        ``output_fn(params, batch, dropout_rng=None, *, label_word_ids)`` with ``[K]`` ids (a
        traced argument of the caller's program, e.g. through
        :func:`lora_jax.trainable.label_words_as_inputs`), so tasks with equal shapes share
        one compiled program. Its capabilities then name no ``embedding_rows`` (they depend
        on the call).

    The batch is a dict with ``input_ids`` [B, T], ``attention_mask`` [B, T], optionally
    ``token_type_ids`` [B, T], and ``mask_pos`` [B] (the ``<mask>`` position; prompt modes).
    Or a packed batch (:func:`lora_jax.packing.pack`: ``segment_ids`` [1, P], ``token_index``
    [B, T] and ``row_starts`` [B] beside the token arrays [1, P]) where its capabilities
    (:mod:`lora_jax.capabilities`) say ``packs_rows``: MLM, TIED and TIED_MEAN on this library's
    encoders other than DeBERTa. Same [B, K].

    Raises:
      ConfigError: a prompt readout given neither ``label_word_ids`` nor
        ``label_words_at_call``, or given both; at call time, ids passed to a function with
        fixed ids, or none passed to one that takes them per call.
    """
    readout = Readout(readout)
    if label_words_at_call and label_word_ids is not None:
        raise ConfigError(
            "make_output_fn got label_word_ids and label_words_at_call=True; pass the ids "
            "either fixed (label_word_ids) or per call (label_words_at_call=True), not both."
        )
    if readout != Readout.CLS and label_word_ids is None and not label_words_at_call:
        raise ConfigError(
            f"readout={readout.value!r} needs label_word_ids (the K label words), or "
            "label_words_at_call=True to pass them per call."
        )
    fixed = None if label_word_ids is None else jnp.asarray(label_word_ids, jnp.int32)

    def label_words(given):
        """The ``[K]`` ids of this call: the fixed ones, or those given per call."""
        if label_words_at_call and given is None and readout != Readout.CLS:
            raise ConfigError(
                f"this output_fn (readout={readout.value!r}) takes its label words per call: "
                "pass label_word_ids=[K] ids (or build it with fixed label_word_ids)."
            )
        if not label_words_at_call and given is not None:
            raise ConfigError(
                "this output_fn has fixed label_word_ids; build it with "
                "label_words_at_call=True to pass them per call."
            )
        return fixed if given is None else jnp.asarray(given, jnp.int32)

    def output_fn(params, batch, dropout_rng=None, *, label_word_ids=None):
        ids = label_words(label_word_ids)
        inputs = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        packed = {k: batch[k] for k in ("segment_ids", "token_index") if k in batch}
        if readout == Readout.CLS:
            return apply_fn(params, *inputs, dropout_rng=dropout_rng, **packed)
        if readout == Readout.MLM:
            return apply_fn(
                params,
                *inputs,
                mask_positions=batch["mask_pos"],
                label_word_ids=ids,
                dropout_rng=dropout_rng,
                **packed,
            )
        if readout == Readout.RTD:
            return _rtd_scores(apply_fn, params, batch, ids, dropout_rng)
        if readout == Readout.TIED:
            hidden = apply_fn(
                params, *inputs, mask_positions=batch["mask_pos"], dropout_rng=dropout_rng, **packed
            )  # (B, H)
        else:
            states = apply_fn(params, *inputs, dropout_rng=dropout_rng, **packed)  # (B, T, H)
            if packed:  # (1, P, H): mean over each row's segment -> (B, H)
                rows = jnp.arange(1, batch["row_starts"].shape[0] + 1)[:, None]  # (B, 1)
                member = (batch["segment_ids"] == rows).astype(states.dtype)  # (B, P)
                hidden = member @ states[0] / member.sum(1, keepdims=True)
            else:
                mask = batch["attention_mask"][..., None].astype(states.dtype)  # (B, T, 1)
                hidden = states.sum(1, where=mask > 0) / mask.sum(1)  # (B, H)
        return hidden @ _word_rows(params, ids).T.astype(hidden.dtype)  # (B, K)

    if getattr(apply_fn, "func", None) is not forward:
        return Declared(output_fn)  # someone else's model: nothing is known about it
    return Declared(
        output_fn,
        Capabilities(
            # It reads packed batches (lora_jax.packing) where the encoder's attention does.
            packs_rows=readout in (Readout.MLM, Readout.TIED, Readout.TIED_MEAN)
            and apply_fn.keywords["config"].model_type != "deberta-v2",
            # Masked keys get exactly zero attention weight, so trailing padding changes
            # nothing: the eNTK may cut it.
            ignores_padding=True,
            # Our encoder reads its tables through `embed`, so the eNTK may compact them to the
            # rows a batch reads (ntk.compact); besides the input ids, this readout reads these.
            embedding_rows=None
            if label_words_at_call and readout != Readout.CLS
            else ()
            if fixed is None
            else tuple(int(i) for i in np.asarray(fixed)),
        ),
    )


def _rtd_scores(apply_fn, params, batch, ids, dropout_rng) -> jax.Array:
    """``[B, K]`` "original" logits of each label word put at ``<mask>`` (one pass per word)."""
    input_ids, pos = batch["input_ids"], batch["mask_pos"]
    (B, T), K = input_ids.shape, ids.shape[0]
    at_mask = jnp.arange(T)[None, None, :] == pos[:, None, None]  # (B, 1, T)
    filled = jnp.where(at_mask, ids[None, :, None], input_ids[:, None, :])  # (B, K, T)

    def rows(a):  # (B, T) -> (B * K, T), each example repeated K times
        return None if a is None else jnp.repeat(a, K, axis=0)

    replaced = apply_fn(
        params,
        filled.reshape(B * K, T),
        rows(batch["attention_mask"]),
        rows(batch.get("token_type_ids")),
        mask_positions=jnp.repeat(pos, K),
        dropout_rng=dropout_rng,
    )  # (B * K,)
    return -replaced.reshape(B, K)


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
