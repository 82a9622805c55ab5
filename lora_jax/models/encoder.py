"""RoBERTa / BERT / ELECTRA / DeBERTa encoders as pure functions over HF-named parameter dicts.

The forward pass (:func:`forward`) is a pure function of a nested dict whose keys mirror the
Hugging Face PyTorch module names (``roberta.encoder.layer.0.attention.self.query.kernel``), so a
checkpoint converts by renames and transposes only, and LoRA leaves written into any Linear are
picked up by :func:`lora_jax.models.layers.dense`. :class:`EncoderModel` is an ``nnx.Module``
holding the same tree as ``nnx.Param`` s (each with logical sharding names);
:func:`split` returns the pure ``(apply_fn, params)`` pair that training and NTK code use.

ELECTRA is the BERT body with its embeddings (width ``embedding_size``) projected to the hidden
size; DeBERTa-v2/v3 has its own body and heads in :mod:`lora_jax.models.deberta`.

References:
  Clark et al., "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
  Generators", arXiv:2003.10555, 2020.
  Liu et al., "RoBERTa: A Robustly Optimized BERT Pretraining Approach", arXiv:1907.11692, 2019.
  Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers", arXiv:1810.04805, 2018.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax import sharding
from lora_jax.errors import ConfigError
from lora_jax.models import deberta
from lora_jax.models.config import EncoderConfig, Head
from lora_jax.models.layers import (
    activation,
    attention,
    block_shapes,
    dense,
    dense_stack,
    dropout,
    embed,
    gelu_exact,
    layer_norm,
    mlm_head_shapes,
)
from lora_jax.packing import PackedLayout, segment_positions
from lora_jax.params import unflatten
from lora_jax.sharding import leaf_axes

PyTree = Any
DTYPES = ("float32", "bfloat16", "float64")


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------


_LORA_STREAM = 0x10AA  # the LoRA dropout masks' own key stream


class _DropoutKeys:
    """Hands out one fresh key per dropout site (``fold_in`` of a counter); None when off.

    ``keys()`` serves the model's own (HF) dropout sites; ``keys.lora()`` one key per Linear
    call for PEFT's ``lora_dropout``, from a separate stream, so the model's masks are the same
    with or without LoRA modules.
    """

    def __init__(self, rng: jax.Array | None):
        self.rng, self.count, self.lora_count = rng, 0, 0
        # Added to the counters (traced under a scan over layers: layer i's first key).
        self.offset, self.lora_offset = 0, 0

    def __call__(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.rng, self.offset + self.count)

    def lora(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.lora_count += 1
        stream = jax.random.fold_in(self.rng, _LORA_STREAM)
        return jax.random.fold_in(stream, self.lora_offset + self.lora_count)


def _embeddings(
    p, input_ids, token_type_ids, cfg: EncoderConfig, dtype, keys, layout=None
) -> jax.Array:
    B, T = input_ids.shape
    if layout is not None:  # packed rows: positions restart at each row
        # The unused tail (segment 0) reads a valid row too: a NaN there would reach real tokens
        # through their zero attention weights (0 * NaN).
        first = cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0
        tail = cfg.pad_token_id if cfg.model_type == "roberta" else 0
        seg = layout.segment_ids
        positions = jnp.where(seg > 0, segment_positions(seg) + first, tail)
    elif cfg.model_type == "roberta":
        # HF create_position_ids_from_input_ids: padding_idx + running count of real tokens.
        not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id  # (B, T)
    else:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = embed(p["word_embeddings"], input_ids).astype(dtype)
    x = x + embed(p["position_embeddings"], positions).astype(dtype)
    x = x + embed(p["token_type_embeddings"], token_type_ids).astype(dtype)
    x = layer_norm(p["LayerNorm"], x, cfg.layer_norm_eps)  # (B, T, E)
    return dropout(x, cfg.hidden_dropout_prob, keys())


def _encode(
    base,
    input_ids,
    attention_mask,
    token_type_ids,
    cfg: EncoderConfig,
    dtype,
    keys,
    rows,
    remat,
    layout=None,
):
    """The encoder body: ``(B, T)`` ids -> ``(B, T, H)``, or ``(B, 1, H)`` with ``rows`` (B,).

    With a ``layout`` (packed rows, :class:`lora_jax.packing.PackedLayout`) the ids are
    ``(1, P)`` and the output ``(1, P, H)``, or ``(B, 1, H)`` with ``rows`` (B,) packed positions.
    """
    if cfg.model_type == "deberta-v2":
        if layout is not None:
            raise ConfigError(
                "DeBERTa-v2 does not take packed rows (segment_ids): its relative-position "
                "attention is not written for them. Train it on padded batches (pack=False)."
            )
        return deberta.encode(
            base, input_ids, attention_mask, token_type_ids, cfg, dtype, keys, rows, remat
        )
    x = _embeddings(base["embeddings"], input_ids, token_type_ids, cfg, dtype, keys, layout)
    if "embeddings_project" in base:  # ELECTRA with embedding_size != hidden_size
        x = dense(base["embeddings_project"], x, keys.lora())  # (B, T, H)
    key_mask = attention_mask > 0 if layout is None else layout.key_mask()  # (B, T) bool
    layers = [base["encoder"]["layer"][i] for i in range(cfg.num_hidden_layers)]
    last = cfg.num_hidden_layers - 1
    first = 0
    if _scannable(layers[:last]):  # all but the last layer (which may keep only `rows`)
        x = _scan_layers(layers[:last], x, key_mask, cfg, dtype, keys, layout, remat)
        first = last
    for i in range(first, cfg.num_hidden_layers):
        r = rows if i == last else None
        block = lambda p, x, r=r: _block(p, x, key_mask, cfg, keys, r, layout)  # noqa: E731
        x = (jax.checkpoint(block) if remat else block)(layers[i], x)
    return x


# Encoders of this many layers or more run their layers under one `lax.scan` over the stacked
# layer weights: one compiled layer body instead of L copies, so a 24-layer encoder compiles in a
# fraction of the time (figures: benchmarks/README.md, "Compile time"). Smaller ones stay
# unrolled (XLA may then fuse across layers, and their programs compile fast anyway).
SCAN_MIN_LAYERS = 12
# Dropout sites (`keys()`) and Linear calls (`keys.lora()`) of one full `_block`.
_BLOCK_KEYS, _BLOCK_LORA_KEYS = 3, 6


def _scannable(layers: list) -> bool:
    """Whether ``layers`` can run as one scan: enough of them, all of one structure and shapes
    (LoRA on only some layers, or per-layer ranks, keep the unrolled loop)."""
    if len(layers) + 1 < SCAN_MIN_LAYERS:
        return False
    shape = lambda t: jax.tree.map(lambda a: (np.shape(a), jnp.result_type(a)), t)  # noqa: E731
    first = shape(layers[0])
    return all(
        jax.tree.structure(p) == jax.tree.structure(layers[0]) and shape(p) == first
        for p in layers[1:]
    )


def _scan_layers(
    layers: list, x, key_mask, cfg: EncoderConfig, dtype, keys, layout, remat
) -> jax.Array:
    """``_block`` of each of ``layers`` in turn, as one ``lax.scan`` over their stacked weights,
    with the dropout keys the unrolled loop would hand out (layer i continues the counters)."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)  # leaves (L - 1, ...)
    # Kernels in the compute dtype before the scan (`dense` casts them to it anyway): the
    # backward pass then reads each layer's kernel from this stack instead of saving a cast
    # copy of it per layer.
    stacked = jax.tree_util.tree_map_with_path(
        lambda kp, w: w.astype(dtype) if kp[-1] == jax.tree_util.DictKey("kernel") else w,
        stacked,
    )
    start, lora_start = keys.count, keys.lora_count

    def body(x, layer):
        p, i = layer
        own = _DropoutKeys(keys.rng)
        own.offset = keys.offset + start + i * _BLOCK_KEYS
        own.lora_offset = keys.lora_offset + lora_start + i * _BLOCK_LORA_KEYS
        y = _block(p, x, key_mask, cfg, own, None, layout)
        if keys.rng is not None and (own.count, own.lora_count) != (
            _BLOCK_KEYS,
            _BLOCK_LORA_KEYS,
        ):
            raise AssertionError(f"_block drew {own.count, own.lora_count} keys; update _BLOCK_*")
        return y, None

    step = jax.checkpoint(body) if remat else body
    x, _ = jax.lax.scan(step, x, (stacked, jnp.arange(len(layers), dtype=jnp.int32)))
    keys.count += len(layers) * _BLOCK_KEYS
    keys.lora_count += len(layers) * _BLOCK_LORA_KEYS
    return x


def _block(p, x, key_mask, cfg: EncoderConfig, keys, rows=None, layout=None) -> jax.Array:
    """One transformer layer: ``x`` (B, T, H) -> (B, T, H), or (B, 1, H) with ``rows``.

    With ``rows`` ((B,) int positions) only the output at those positions is computed: keys and
    values still come from every token, but the query, the attention output and the
    feed-forward run on one token per example. ``forward`` uses this in the last layer when the
    head reads one position (``<s>`` / ``[CLS]`` or ``<mask>``), which skips most of that layer's
    work, forward and backward. Same values as slicing the full layer's output.

    With a ``layout`` (packed rows) ``x`` is ``(1, P, H)``: the dense layers run on the P packed
    tokens, attention on their padded ``(B, T)`` form (``key_mask`` (B, T)).
    """
    a = p["attention"]
    if rows is None:
        q, k, v = dense_stack(
            [a["self"][n] for n in ("query", "key", "value")], x, [keys.lora() for _ in range(3)]
        )
    else:
        k, v = dense_stack([a["self"]["key"], a["self"]["value"]], x, [keys.lora(), keys.lora()])
        if layout is None:
            x = jnp.take_along_axis(x, rows[:, None, None], axis=1)  # (B, 1, H)
        else:
            x = jnp.take(x[0], rows, axis=0)[:, None, :]  # (B, 1, H)
        q = dense(a["self"]["query"], x, keys.lora())
    if layout is not None:  # attention on the padded form
        k, v = layout.to_rows(k), layout.to_rows(v)  # (B, T, H)
        q = q if rows is not None else layout.to_rows(q)
    heads = (k.shape[0], -1, cfg.num_attention_heads, cfg.head_dim)  # (B, T or 1, nh, hd)
    ctx = attention(
        q.reshape(heads),
        k.reshape(heads),
        v.reshape(heads),
        key_mask,
        dropout_rate=cfg.attention_probs_dropout_prob,
        dropout_rng=keys(),
    ).reshape(q.shape)  # (B, T or 1, H)
    if layout is not None and rows is None:
        ctx = layout.to_packed(ctx)  # (1, P, H)
    y = dropout(dense(a["output"]["dense"], ctx, keys.lora()), cfg.hidden_dropout_prob, keys())
    x = layer_norm(a["output"]["LayerNorm"], y + x, cfg.layer_norm_eps)
    h = activation(cfg.hidden_act, dense(p["intermediate"]["dense"], x, keys.lora()))  # (B, T|1, I)
    y = dropout(dense(p["output"]["dense"], h, keys.lora()), cfg.hidden_dropout_prob, keys())
    return layer_norm(p["output"]["LayerNorm"], y + x, cfg.layer_norm_eps)


def _mlm_parts(params, cfg: EncoderConfig) -> tuple[dict, dict, jax.Array, dict | None, str]:
    """(transform dense, its LayerNorm, output bias, untied decoder or None, activation)."""
    if cfg.model_type == "roberta":  # RobertaLMHead: erf gelu
        h = params["lm_head"]
        return h["dense"], h["layer_norm"], h["bias"], h.get("decoder"), "gelu"
    if cfg.model_type == "electra":  # ElectraGeneratorPredictions + generator_lm_head
        g, out = params["generator_predictions"], params["generator_lm_head"]
        return g["dense"], g["LayerNorm"], out["bias"], out if "kernel" in out else None, "gelu"
    if cfg.model_type == "deberta-v2" and not cfg.legacy:  # DebertaV2LMPredictionHead
        h = params["lm_predictions"]["lm_head"]
        return h["dense"], h["LayerNorm"], h["bias"], None, cfg.hidden_act
    h = params["cls"]["predictions"]  # BERT, and DeBERTa's legacy (default) head
    t = h["transform"]
    return t["dense"], t["LayerNorm"], h["bias"], h.get("decoder"), cfg.hidden_act


def _mlm_logits(params, base, h, cfg: EncoderConfig, label_word_ids, keys) -> jax.Array:
    """MLM head on ``h`` (..., H): transform, then the (tied) decoder, optionally on K words."""
    transform, norm, bias, decoder, act = _mlm_parts(params, cfg)
    h = activation(act, dense(transform, h, keys.lora()))
    h = layer_norm(norm, h, cfg.layer_norm_eps)  # (..., E)
    if decoder is None:  # tied: decoder weight is the word-embedding matrix (V, E)
        table = base["embeddings"]["word_embeddings"]
        if label_word_ids is not None:
            words, bias = embed(table, label_word_ids), jnp.take(bias, label_word_ids)
        elif "rows" in table:
            raise ValueError(
                "A compacted word-embedding table holds only some rows; full-vocabulary MLM "
                "logits need them all. Pass label_word_ids."
            )
        else:
            words = table["embedding"]
        return h @ words.astype(h.dtype).T + bias.astype(h.dtype)  # (..., V) or (..., K)
    kernel = decoder["kernel"]  # (E, V), untied
    if label_word_ids is not None:
        kernel, bias = jnp.take(kernel, label_word_ids, axis=1), jnp.take(bias, label_word_ids)
    return h @ kernel.astype(h.dtype) + bias.astype(h.dtype)


def _rtd_logits(params, h, cfg: EncoderConfig, keys) -> jax.Array:
    """ELECTRA's discriminator (``ElectraForPreTraining``): ``h`` (..., H) -> (...) logits.

    A positive logit means "replaced"; ``-logit`` is the score of the token being original.
    """
    d = params["discriminator_predictions"]
    hidden = activation(cfg.hidden_act, dense(d["dense"], h, keys.lora()))
    return dense(d["dense_prediction"], hidden, keys.lora())[..., 0]


def cls_head(
    params: PyTree,
    first: jax.Array,
    *,
    config: EncoderConfig,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """The sequence-classification head alone, on the final hidden state of ``<s>`` / ``[CLS]``.

    ``forward(params, ..., head='cls')`` equals ``cls_head(params, h, config=config)`` with ``h``
    the hidden states at position 0 (``forward(..., head=None, mask_positions=zeros)``). With
    the encoder frozen and dropout off, a head can so be trained on features computed once.

    Args:
      params: the model's params (the head reads ``classifier``, and BERT's ``pooler``).
      first: ``(B, H)`` final hidden states at position 0.
      config: the encoder's :class:`EncoderConfig`.
      dropout_rng: PRNG key for the head's dropout; None is deterministic.

    Returns:
      ``(B, num_labels)`` logits.
    """
    return _cls_logits(params, params[config.base_prefix], first, config, _DropoutKeys(dropout_rng))


def _cls_logits(params, base, first, cfg: EncoderConfig, keys) -> jax.Array:
    """HF's sequence-classification heads on ``first`` (B, H), the <s> / [CLS] hidden state."""
    if cfg.model_type == "deberta-v2":
        return deberta.cls_logits(params, first, cfg, keys)
    rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    if cfg.model_type in ("roberta", "electra"):  # ELECTRA's head uses gelu where RoBERTa's tanh
        c = params["classifier"]
        h = dense(c["dense"], dropout(first, rate, keys()), keys.lora())
        h = jnp.tanh(h) if cfg.model_type == "roberta" else gelu_exact(h)
        return dense(c["out_proj"], dropout(h, rate, keys()), keys.lora())  # (B, num_labels)
    pooled = jnp.tanh(dense(base["pooler"]["dense"], first, keys.lora()))  # (B, H)
    return dense(params["classifier"], dropout(pooled, rate, keys()), keys.lora())  # (B, K)


def forward(
    params: PyTree,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    config: EncoderConfig,
    head: Head | str | None,
    dtype: Any = jnp.float32,
    mask_positions: jax.Array | None = None,
    label_word_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    remat: bool = False,
    segment_ids: jax.Array | None = None,
    token_index: jax.Array | None = None,
) -> jax.Array:
    """Pure forward pass of a RoBERTa / BERT / ELECTRA / DeBERTa encoder with an optional head.

    Args:
      params: HF-named nested dict (see :func:`split`), possibly with fused LoRA leaves.
      input_ids: ``(B, T)`` int token ids.
      attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding; None means all ones.
      token_type_ids: ``(B, T)`` int segment ids; None means zeros.
      config: the encoder's :class:`EncoderConfig`.
      head: ``'mlm'``, ``'cls'``, ``'rtd'`` (ELECTRA's discriminator) or None (hidden states).
      dtype: compute dtype (float32, bfloat16 or float64); parameters are cast to it.
      mask_positions: ``(B,)`` int position of the token whose outputs are wanted (``<mask>``).
      label_word_ids: ``(K,)`` int vocabulary ids; with ``head='mlm'`` and ``mask_positions``
        only these K decoder rows are computed.
      dropout_rng: PRNG key turning on HF's dropout rates; None is deterministic.
      remat: recompute each layer's activations in the backward pass (``jax.checkpoint``)
        instead of storing them: less memory for long sequences or large batches, about one
        more forward pass of compute. Same numbers.
      segment_ids, token_index: packed rows (:func:`lora_jax.packing.pack`): ``input_ids``
        etc. are ``(1, P)``, ``segment_ids`` ``(1, P)`` marks each token's row (1..B; 0 on the
        unused tail) and ``token_index`` ``(B, T)`` gives where row b's token t went (P for
        padding). The dense layers run on the P tokens, attention on the ``(B, T)`` rows, and
        positions restart at each row: every row's outputs are those of the padded batch.
        ``mask_positions`` are then ``(B,)`` packed positions; head None without them gives
        ``(1, P, H)``. Not for DeBERTa or head 'cls'.

    Returns:
      head 'mlm': ``(B, T, V)`` logits, ``(B, V)`` at ``mask_positions``, ``(B, K)`` with
      ``label_word_ids``. head 'cls': ``(B, num_labels)``. head 'rtd': ``(B, T)`` "replaced"
      logits, ``(B,)`` at ``mask_positions``. head None: ``(B, T, H)`` hidden states, or
      ``(B, H)`` at ``mask_positions``. All in the compute dtype.
    """
    if label_word_ids is not None and (head != "mlm" or mask_positions is None):
        raise ConfigError(
            f"label_word_ids needs head='mlm' and mask_positions (got head={head!r}, "
            f"mask_positions={'None' if mask_positions is None else 'given'}). Pass the "
            "<mask> positions, or use a model loaded with head='mlm'."
        )
    if head == "cls" and mask_positions is not None:
        raise ConfigError(
            "mask_positions is for head='mlm' or head=None; head='cls' reads <s> / [CLS]."
        )
    packed = segment_ids is not None or token_index is not None
    if packed and (
        segment_ids is None or token_index is None or head == "cls" or np.shape(input_ids)[0] != 1
    ):
        raise ConfigError(
            f"packed rows take segment_ids and token_index together, input_ids of shape (1, P) "
            f"and a head that reads mask_positions or hidden states (got shape "
            f"{np.shape(input_ids)}, head={head!r}); pack the batch with lora_jax.packing.pack, "
            "or use padded rows for head='cls'."
        )
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, T = input_ids.shape
    limit = config.max_tokens
    # Packed rows restart their positions: each row is as long as it was before packing.
    if limit is not None and not packed and T > limit:
        raise ConfigError(
            f"Sequence length {T} exceeds what the position table allows "
            f"({limit} tokens for this {config.model_type}); "
            "tokenize with truncation=True and a smaller max_length."
        )
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    if token_type_ids is None:
        token_type_ids = jnp.zeros((B, T), jnp.int32)
    keys = _DropoutKeys(dropout_rng)
    base = params[config.base_prefix]
    # The head reads one position per example: the last layer computes only that one.
    rows = (
        jnp.zeros((B,), jnp.int32)
        if head == "cls"
        else None
        if mask_positions is None
        else jnp.asarray(mask_positions, jnp.int32)
    )
    x = _encode(
        base,
        input_ids,
        jnp.asarray(attention_mask),
        jnp.asarray(token_type_ids),
        config,
        dtype,
        keys,
        rows,
        remat,
        PackedLayout(jnp.asarray(segment_ids, jnp.int32), jnp.asarray(token_index, jnp.int32))
        if packed
        else None,
    )
    if head == "cls":
        return _cls_logits(params, base, x[:, 0], config, keys)
    if rows is not None:
        x = x[:, 0]  # (B, H): the last layer kept only the wanted position
    if head == "mlm":
        ids = None if label_word_ids is None else jnp.asarray(label_word_ids, jnp.int32)
        return _mlm_logits(params, base, x, config, ids, keys)
    if head == "rtd":
        return _rtd_logits(params, x, config, keys)
    return x


_jit_forward = jax.jit(forward, static_argnames=("config", "head", "dtype", "remat"))


# --------------------------------------------------------------------------------------------
# Parameters: init and logical axes
# --------------------------------------------------------------------------------------------


# The MLM head's parameters: (transform dense, its LayerNorm, output bias, untied decoder).
_MLM_HEAD: dict[str, tuple[str, str, str, str | None]] = {
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder.kernel"),
    "bert": deberta.BERT_MLM_HEAD,
    "electra": (
        "generator_predictions.dense",
        "generator_predictions.LayerNorm",
        "generator_lm_head.bias",
        "generator_lm_head.kernel",
    ),
}


def param_shapes(
    config: EncoderConfig, *, head: Head | str | None, num_labels: int | None, pooler: bool
) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every parameter of the model (HF names, our layouts)."""
    if config.model_type == "deberta-v2":
        return deberta.param_shapes(config, head=head, num_labels=num_labels)
    H, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, num_labels
    E, b = config.embed_dim, config.base_prefix
    s: dict[str, tuple[int, ...]] = {
        f"{b}.embeddings.word_embeddings.embedding": (V, E),
        f"{b}.embeddings.position_embeddings.embedding": (config.max_position_embeddings, E),
        f"{b}.embeddings.token_type_embeddings.embedding": (config.type_vocab_size, E),
        f"{b}.embeddings.LayerNorm.scale": (E,),
        f"{b}.embeddings.LayerNorm.bias": (E,),
    }

    def linear(name: str, n_in: int, n_out: int) -> None:
        s[f"{name}.kernel"], s[f"{name}.bias"] = (n_in, n_out), (n_out,)

    if E != H:  # ELECTRA
        linear(f"{b}.embeddings_project", E, H)

    for i in range(config.num_hidden_layers):
        qkv = ("query", "key", "value")
        s |= block_shapes(f"{b}.encoder.layer.{i}", qkv, hidden=H, intermediate=I)
    if pooler:
        linear(f"{b}.pooler.dense", H, H)
    if head == "mlm":
        width = E if config.model_type == "electra" else H
        paths = _MLM_HEAD[config.model_type]
        s |= mlm_head_shapes(paths, n_in=H, width=width, vocab=V, tied=config.tie_word_embeddings)
    elif config.model_type == "electra":
        if head == "rtd":
            linear("discriminator_predictions.dense", H, H)
            linear("discriminator_predictions.dense_prediction", H, 1)
        elif head == "cls":
            linear("classifier.dense", H, H)
            linear("classifier.out_proj", H, L)
    elif head == "cls":
        if config.model_type == "roberta":
            linear("classifier.dense", H, H)
            linear("classifier.out_proj", H, L)
        else:
            linear("classifier", H, L)
    return s


def param_dtype_for(dtype: Any) -> type:
    """The parameter dtype of a model that computes in ``dtype``: float64 for float64, else
    float32 (bfloat16 models keep float32 parameters)."""
    return np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32


def init_params(
    config: EncoderConfig,
    *,
    head: Head | str | None,
    num_labels: int | None,
    seed: int,
    pooler: bool,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """Random HF-style init, as a flat ``{dotted_path: array}`` dict of numpy arrays.

    Linear kernels and embeddings ~ N(0, initializer_range^2) (padding row of the word
    embeddings zeroed, as HF does), biases 0, LayerNorm scale 1, stored in
    ``param_dtype_for(dtype)`` for the compute ``dtype``. numpy's generator is used so that
    building a model compiles nothing.
    """
    param_dtype = param_dtype_for(dtype)
    shapes = param_shapes(config, head=head, num_labels=num_labels, pooler=pooler)
    rng = np.random.default_rng(seed)
    flat: dict[str, np.ndarray] = {}
    for path, shape in sorted(shapes.items()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("kernel", "embedding"):
            w = config.initializer_range * rng.standard_normal(shape)
            if path.endswith("word_embeddings.embedding"):
                w[config.pad_token_id] = 0.0
        elif leaf == "scale":
            w = np.ones(shape)
        else:
            w = np.zeros(shape)
        flat[path] = w.astype(param_dtype)
    return flat


# --------------------------------------------------------------------------------------------
# NNX module
# --------------------------------------------------------------------------------------------


class _Node(nnx.Module):
    """A sub-module whose attributes mirror one level of the HF module tree."""

    def __init__(self, tree: Mapping[str, Any], prefix: str):
        for key, child in tree.items():
            setattr(self, str(key), _to_module(child, f"{prefix}.{key}" if prefix else str(key)))


def _to_module(node: Any, path: str) -> Any:
    if isinstance(node, Mapping):
        if node and all(isinstance(k, int) for k in node):
            return nnx.List([_to_module(node[i], f"{path}.{i}") for i in range(len(node))])
        return _Node(node, path)
    value = jnp.asarray(node)
    # Logical names only: the lead's rule table maps them to a mesh (no mesh is forced here).
    return nnx.Param(value, out_sharding=leaf_axes(path, value.ndim), eager_sharding=False)


def _check_dtype(dtype: Any) -> Any:
    dt = jnp.dtype(dtype)
    if dt.name not in DTYPES:
        raise ConfigError(f"dtype={dt.name!r} is not supported; expected one of {DTYPES}.")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError(
            "dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
            "(or use `with jax.experimental.enable_x64():`) before creating the model."
        )
    return dt


def _check_head(head: Head | str | None, num_labels: int | None) -> Head | None:
    """Returns ``head`` as a :class:`Head` (or None) after checking it against ``num_labels``."""
    if head is not None:
        try:
            head = Head(head)
        except ValueError:
            allowed = ", ".join([repr(h.value) for h in Head] + ["None"])
            raise ConfigError(
                f"head={head!r} is not supported; expected one of {allowed}."
            ) from None
    if head == "cls":
        if num_labels is None:
            raise ConfigError(
                "head='cls' needs num_labels (the number of classes), got None; pass e.g. "
                "num_labels=2."
            )
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels={num_labels!r} must be a positive integer.")
    elif num_labels is not None:
        raise ConfigError(
            f"num_labels={num_labels} only applies to head='cls' (got head={head!r}); drop it."
        )
    return head


class EncoderModel(nnx.Module):
    """A RoBERTa / BERT encoder with an MLM head, a classification head, or none.

    Parameters are ``nnx.Param`` s arranged like the HF PyTorch modules (``model.roberta.
    encoder.layer[0].attention.self.query.kernel``), each with logical sharding names in its
    ``out_sharding`` metadata. Build with :func:`create` or
    :func:`lora_jax.models.from_pretrained`; call like HF (see :func:`forward`).

    Attributes:
      config: the :class:`EncoderConfig`.
      head: a :class:`Head` (``'mlm'``, ``'cls'``, ``'rtd'``) or None.
      num_labels: classes of the ``'cls'`` head, else None.
      dtype: compute dtype.
    """

    def __init__(
        self,
        config: EncoderConfig,
        params: Mapping[str, Any],
        *,
        head: Head | str | None,
        num_labels: int | None = None,
        dtype: Any = jnp.float32,
    ):
        head = _check_head(head, num_labels)
        if head == "rtd" and config.model_type != "electra":
            raise ConfigError(
                f"head='rtd' (replaced-token detection) is ELECTRA's discriminator head; a "
                f"{config.model_type} model has none. Use head='mlm', 'cls' or None."
            )
        self.config = config
        self.head = head
        self.num_labels = num_labels
        self.dtype = _check_dtype(dtype)
        for key, child in params.items():
            setattr(self, key, _to_module(child, key))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        mask_positions: jax.Array | None = None,
        label_word_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Runs :func:`forward` (jitted) on this module's parameters (see there for shapes)."""
        return _jit_forward(
            nnx.to_pure_dict(nnx.state(self, nnx.Param)),
            input_ids,
            attention_mask,
            token_type_ids,
            config=self.config,
            head=self.head,
            dtype=self.dtype,
            mask_positions=mask_positions,
            label_word_ids=label_word_ids,
            dropout_rng=dropout_rng,
        )


def create(
    config: EncoderConfig,
    *,
    head: Head | str | None = Head.MLM,
    num_labels: int | None = None,
    seed: int = 0,
    dtype: Any = jnp.float32,
) -> EncoderModel:
    """A randomly initialized encoder (HF init: normal(``initializer_range``)).

    Args:
      config: the encoder shape.
      head: a :class:`Head` (``'mlm'``, ``'cls'``, ``'rtd'``) or None.
      num_labels: classes for ``head='cls'`` (required there).
      seed: init seed.
      dtype: compute dtype; parameters are float64 for float64, else float32.

    Returns:
      An :class:`EncoderModel`. BERT gets a pooler for ``head`` None or ``'cls'`` (as HF's
      ``BertModel`` / ``BertForSequenceClassification``); RoBERTa heads do not use one.
    """
    head = _check_head(head, num_labels)
    dt = _check_dtype(dtype)
    pooler = config.model_type == "bert" and head != "mlm"
    flat = init_params(config, head=head, num_labels=num_labels, seed=seed, pooler=pooler, dtype=dt)
    return EncoderModel(config, unflatten(flat), head=head, num_labels=num_labels, dtype=dt)


def split(model: EncoderModel) -> tuple[Callable[..., jax.Array], dict]:
    """The model as a pure function and a plain nested parameter dict.

    Returns:
      ``(apply_fn, params)``: ``params`` is a nested dict of arrays keyed like the HF modules
      (int keys for layers); ``apply_fn(params, input_ids, attention_mask=None,
      token_type_ids=None, *, mask_positions=None, label_word_ids=None, dropout_rng=None)`` is
      pure and jittable and equals ``model(...)``.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    apply_fn = functools.partial(forward, config=model.config, head=model.head, dtype=model.dtype)
    return apply_fn, params


def logical_axes(model_or_params: EncoderModel | Mapping) -> dict:
    """Logical axis names of every parameter, in the structure of ``split(model)[1]``.

    Accepts a model or a params dict (which may hold fused LoRA leaves). Each leaf is a tuple
    of names from ``('vocab', 'embed', 'mlp', 'heads', 'lora_rank', None)``.
    """
    if isinstance(model_or_params, EncoderModel):
        params = split(model_or_params)[1]
    else:
        params = model_or_params
    return sharding.logical_axes(params)
