"""DeBERTa-v2 / v3 encoder body and heads as pure functions over HF-named parameter dicts.

Disentangled attention (He et al.) adds to the content-to-content scores ``q_i . k_j`` a
content-to-position term ``q_i . pk[d(i, j)]`` (c2p) and a position-to-content term
``k_j . pq[d(j, i)]`` (p2c), where ``pk`` / ``pq`` are projections of a learned table of
``2 S`` relative-position embeddings and ``d`` is the (log-bucketed) relative distance. All
terms are divided by ``sqrt(head_dim * (1 + number of relative terms))``. This module follows
``transformers.models.deberta_v2.modeling_deberta_v2`` (5.x) term by term, including which
scalars are computed in float32, so float64 runs match PyTorch float64 to ~1e-12.

:func:`lora_jax.models.encoder.forward` dispatches here for ``model_type='deberta-v2'``; the
parameter names are HF's (``deberta.encoder.layer.0.attention.self.query_proj.kernel``), so
PEFT's ``query_proj|value_proj`` targets apply unchanged.

References:
  He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", arXiv:2006.03654,
  2020. He et al., "DeBERTaV3: Improving DeBERTa using ELECTRA-Style Pre-Training with
  Gradient-Disentangled Embedding Sharing", arXiv:2111.09543, 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.config import EncoderConfig, Head
from lora_jax.models.layers import (
    activation,
    attend,
    block_shapes,
    dense,
    dense_stack,
    dropout,
    embed,
    layer_norm,
    mlm_head_shapes,
)

Keys = Callable[[], jax.Array | None]


@functools.lru_cache(maxsize=32)
def relative_positions(length: int, buckets: int, max_position: int) -> np.ndarray:
    """HF ``build_relative_position``: ``(T, T)`` int relative distances ``i - j``, bucketed.

    With ``buckets > 0`` distances beyond ``buckets // 2`` are mapped to log buckets
    (``make_log_bucket_position``), computed in float32 as transformers does, so the bucket
    boundaries are the same. A constant of the static length: no work at run time.
    """
    ids = np.arange(length, dtype=np.int64)
    rel = ids[:, None] - ids[None, :]  # (T, T)
    if buckets <= 0 or max_position <= 0:
        return rel
    mid = buckets // 2
    sign = np.sign(rel)
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    ratio = abs_pos.astype(np.float32) / np.float32(mid)
    log_pos = np.ceil(
        np.log(ratio) / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)
    ) + np.float32(mid)
    return np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign).astype(np.int64)


def _max_relative(cfg: EncoderConfig) -> int:
    return (
        cfg.max_position_embeddings
        if cfg.max_relative_positions < 1
        else (cfg.max_relative_positions)
    )


def _position_indices(cfg: EncoderConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(c2p, p2c)`` indices into the ``2 S`` relative embeddings, each ``(T, T)``.

    ``c2p[i, j] = clip(d(i, j) + S)`` and ``p2c[i, j] = clip(-d(j, i) + S)``, so that
    ``c2p_score[i, j] = q_i . pk[c2p[i, j]]`` and ``p2c_score[i, j] = k_j . pq[p2c[i, j]]``.
    """
    rel = relative_positions(length, cfg.position_buckets, _max_relative(cfg))
    span = cfg.attention_span
    c2p = np.clip(rel + span, 0, 2 * span - 1)
    p2c = np.clip(-rel.T + span, 0, 2 * span - 1)
    return c2p, p2c


def _score_scale(cfg: EncoderConfig, dtype) -> jax.Array:
    """``sqrt(head_dim * scale_factor)``, computed in float32 as HF does, then cast."""
    factor = 1 + len(cfg.pos_att_type)
    return jnp.asarray(np.sqrt(np.float32(cfg.head_dim * factor)), dtype)


def embeddings(p, input_ids, token_type_ids, attention_mask, cfg: EncoderConfig, dtype, keys):
    """``DebertaV2Embeddings``: ``(B, T)`` ids -> ``(B, T, H)``, padded positions zeroed."""
    B, T = input_ids.shape
    x = embed(p["word_embeddings"], input_ids).astype(dtype)  # (B, T, E)
    if cfg.position_biased_input:
        x = x + embed(p["position_embeddings"], jnp.arange(T))[None].astype(dtype)
    if cfg.type_vocab_size > 0:
        x = x + embed(p["token_type_embeddings"], token_type_ids).astype(dtype)
    if "embed_proj" in p:
        x = dense(p["embed_proj"], x)  # (B, T, H)
    x = layer_norm(p["LayerNorm"], x, cfg.layer_norm_eps)
    x = x * attention_mask[..., None].astype(dtype)
    return dropout(x, cfg.hidden_dropout_prob, keys())


def _heads(x, cfg: EncoderConfig) -> jax.Array:
    return x.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.head_dim)  # (..., nh, hd)


def _block(p, x, rel, mask, idx, cfg: EncoderConfig, keys, rows=None) -> jax.Array:
    """One DeBERTa layer: ``x`` (B, T, H) -> (B, T, H), or (B, 1, H) for ``rows`` (B,).

    ``rel`` is the (normalized) relative embedding table ``(2 S, H)``, ``mask`` the ``(B, 1,
    Tq, T)`` bool attention mask and ``idx`` the ``(c2p, p2c)`` index arrays ``(B or 1, Tq,
    T)``, already restricted to ``rows``.
    """
    a = p["attention"]["self"]
    if rows is None:
        q, k, v = dense_stack(
            [a[n] for n in ("query_proj", "key_proj", "value_proj")],
            x,
            [keys.lora() for _ in range(3)],
        )
        x_q = x
    else:
        k, v = dense_stack([a["key_proj"], a["value_proj"]], x, [keys.lora(), keys.lora()])
        x_q = jnp.take_along_axis(x, rows[:, None, None], axis=1)  # (B, 1, H)
        q = dense(a["query_proj"], x_q, keys.lora())
    q, k, v = _heads(q, cfg), _heads(k, cfg), _heads(v, cfg)  # (B, Tq or T, nh, hd)
    scale = _score_scale(cfg, x.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k / scale)  # (B, nh, Tq, T)
    if cfg.relative_attention:
        rel = dropout(rel, cfg.hidden_dropout_prob, keys())
        c2p_idx, p2c_idx = idx
        if "c2p" in cfg.pos_att_type:
            pos_key = a["key_proj" if cfg.share_att_key else "pos_key_proj"]
            pk = _heads(dense(pos_key, rel, keys.lora()), cfg)
            c2p = jnp.einsum("bqhd,shd->bhqs", q, pk)  # (B, nh, Tq, 2S)
            scores = scores + jnp.take_along_axis(c2p, c2p_idx[:, None], axis=-1) / scale
        if "p2c" in cfg.pos_att_type:
            pos_query = a["query_proj" if cfg.share_att_key else "pos_query_proj"]
            pq = _heads(dense(pos_query, rel, keys.lora()), cfg)
            p2c = jnp.einsum("bkhd,shd->bhks", k, pq)  # (B, nh, T, 2S)
            # p2c_score[i, j] = k_j . pq[p2c_idx[i, j]]: gather along s for each key j.
            index = jnp.swapaxes(p2c_idx, -1, -2)[:, None]  # (B or 1, 1, T, Tq)
            picked = jnp.take_along_axis(p2c, index, axis=-1)  # (B, nh, T, Tq)
            scores = scores + jnp.swapaxes(picked, -1, -2) / scale
    ctx = attend(scores, mask, v, cfg.attention_probs_dropout_prob, keys())  # (B, Tq, nh, hd)
    ctx = ctx.reshape(*ctx.shape[:2], -1)  # (B, Tq, H)
    o = p["attention"]["output"]
    y = dropout(dense(o["dense"], ctx, keys.lora()), cfg.hidden_dropout_prob, keys())
    x = layer_norm(o["LayerNorm"], y + x_q, cfg.layer_norm_eps)
    h = activation(cfg.hidden_act, dense(p["intermediate"]["dense"], x, keys.lora()))  # (B, Tq, I)
    y = dropout(dense(p["output"]["dense"], h, keys.lora()), cfg.hidden_dropout_prob, keys())
    return layer_norm(p["output"]["LayerNorm"], y + x, cfg.layer_norm_eps)


def encode(
    base, input_ids, attention_mask, token_type_ids, cfg: EncoderConfig, dtype, keys, rows, remat
) -> jax.Array:
    """``DebertaV2Model``: ``(B, T)`` ids -> ``(B, T, H)``, or ``(B, 1, H)`` with ``rows``.

    ``attention_mask`` is ``(B, T)`` int; as in HF, padded queries are masked too (their rows
    attend uniformly), so hidden states at padded positions equal PyTorch's. With ``remat``
    each layer is recomputed in the backward pass (``jax.checkpoint``).
    """
    B, T = input_ids.shape
    x = embeddings(base["embeddings"], input_ids, token_type_ids, attention_mask, cfg, dtype, keys)
    valid = attention_mask > 0  # (B, T)
    mask = valid[:, None, :, None] & valid[:, None, None, :]  # (B, 1, T, T)
    enc = base["encoder"]
    rel, idx, idx_rows = None, (None, None), (None, None)
    if cfg.relative_attention:
        rel = enc["rel_embeddings"]["embedding"][: 2 * cfg.attention_span].astype(dtype)
        if cfg.norm_rel_ebd == "layer_norm":
            rel = layer_norm(enc["LayerNorm"], rel, cfg.layer_norm_eps)  # (2S, H)
        c2p, p2c = (jnp.asarray(i, jnp.int32) for i in _position_indices(cfg, T))
        idx = (c2p[None], p2c[None])  # (1, T, T)
        if rows is not None:
            idx_rows = (c2p[rows][:, None], p2c[rows][:, None])  # (B, 1, T)
    last = cfg.num_hidden_layers - 1
    for i in range(cfg.num_hidden_layers):
        if i == last and rows is not None:
            row_mask = jnp.take_along_axis(mask, rows[:, None, None, None], axis=2)  # (B,1,1,T)
            args = (row_mask, idx_rows, rows)
        else:
            args = (mask, idx, None)
        block = lambda p, x, rel, a=args: _block(p, x, rel, a[0], a[1], cfg, keys, a[2])  # noqa: E731
        x = (jax.checkpoint(block) if remat else block)(base["encoder"]["layer"][i], x, rel)
    return x


def cls_logits(params, first, cfg: EncoderConfig, keys) -> jax.Array:
    """``ContextPooler`` + classifier of ``DebertaV2ForSequenceClassification`` on ``(B, H)``."""
    pooled = dropout(first, cfg.pooler_dropout, keys())
    pooled = activation(
        cfg.pooler_hidden_act, dense(params["pooler"]["dense"], pooled, keys.lora())
    )
    rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    return dense(params["classifier"], dropout(pooled, rate, keys()), keys.lora())  # (B, K)


# MLM head parameters: (transform dense, its LayerNorm, output bias, untied decoder kernel).
# BERT's (BertOnlyMLMHead), which DeBERTa's legacy head shares, and DebertaV2LMPredictionHead's
# (always tied).
BERT_MLM_HEAD = (
    "cls.predictions.transform.dense",
    "cls.predictions.transform.LayerNorm",
    "cls.predictions.bias",
    "cls.predictions.decoder.kernel",
)
_LM_PREDICTIONS_HEAD = (
    "lm_predictions.lm_head.dense",
    "lm_predictions.lm_head.LayerNorm",
    "lm_predictions.lm_head.bias",
    None,
)


def param_shapes(cfg: EncoderConfig, *, head: Head | str | None, num_labels: int | None) -> dict:
    """Dotted path -> shape of every DeBERTa parameter (HF names, our layouts)."""
    H, I, V, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.embed_dim
    s: dict[str, tuple[int, ...]] = {"deberta.embeddings.word_embeddings.embedding": (V, E)}

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        s[f"{name}.kernel"] = (n_in, n_out)
        if bias:
            s[f"{name}.bias"] = (n_out,)

    def norm(name: str, width: int = H) -> None:
        s[f"{name}.scale"], s[f"{name}.bias"] = (width,), (width,)

    if cfg.position_biased_input:
        s["deberta.embeddings.position_embeddings.embedding"] = (cfg.max_position_embeddings, E)
    if cfg.type_vocab_size > 0:
        s["deberta.embeddings.token_type_embeddings.embedding"] = (cfg.type_vocab_size, E)
    if E != H:
        linear("deberta.embeddings.embed_proj", E, H, bias=False)
    norm("deberta.embeddings.LayerNorm")
    if cfg.relative_attention:
        s["deberta.encoder.rel_embeddings.embedding"] = (2 * cfg.attention_span, H)
        if cfg.norm_rel_ebd == "layer_norm":
            norm("deberta.encoder.LayerNorm")
    for i in range(cfg.num_hidden_layers):
        layer = f"deberta.encoder.layer.{i}"
        names = ["query_proj", "key_proj", "value_proj"]
        if cfg.relative_attention and not cfg.share_att_key:
            names += [
                n
                for t, n in (("c2p", "pos_key_proj"), ("p2c", "pos_query_proj"))
                if t in cfg.pos_att_type
            ]
        s |= block_shapes(layer, names, hidden=H, intermediate=I)
    if head == "mlm":
        paths, width = (BERT_MLM_HEAD, E) if cfg.legacy else (_LM_PREDICTIONS_HEAD, H)
        s |= mlm_head_shapes(paths, n_in=H, width=width, vocab=V, tied=cfg.tie_word_embeddings)
    elif head == "cls":
        linear("pooler.dense", H, H)
        linear("classifier", H, num_labels)
    return s
