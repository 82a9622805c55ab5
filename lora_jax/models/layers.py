"""Pure layer functions over plain parameter dicts: Linear (with fused LoRA), LayerNorm, attention.

Every Linear of every model goes through :func:`dense`, so a LoRA adapter written into a
parameter dict as ``lora_a`` / ``lora_b`` / ``lora_scale`` leaves is applied everywhere without
the model knowing about LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Params = Mapping[str, jax.Array]


def dense(p: Params, x: jax.Array) -> jax.Array:
    """Linear layer ``x @ kernel + bias``, plus a fused LoRA update when ``p`` carries one.

    Args:
      p: ``{'kernel': (in, out), 'bias': (out,)}``; optionally ``'lora_a': (in, r)``,
        ``'lora_b': (r, out)`` and ``'lora_scale': ()``, which add
        ``lora_scale * ((x @ lora_a) @ lora_b)`` without forming the merged kernel.
      x: ``(..., in)``.

    Returns:
      ``(..., out)`` in the dtype of ``x``.
    """
    y = x @ p["kernel"].astype(x.dtype)
    if "lora_a" in p:
        low = (x @ p["lora_a"].astype(x.dtype)) @ p["lora_b"].astype(x.dtype)
        y = y + p["lora_scale"].astype(x.dtype) * low
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis; statistics in at least float32 for bfloat16 inputs.

    Args:
      p: ``{'scale': (H,), 'bias': (H,)}``.
      x: ``(..., H)``.
      eps: variance epsilon (HF ``layer_norm_eps``).
    """
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stat_dtype)
    mean = xs.mean(-1, keepdims=True)
    var = jnp.square(xs - mean).mean(-1, keepdims=True)
    y = (xs - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(stat_dtype) + p["bias"].astype(stat_dtype)
    return y.astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """HF ``hidden_act``: ``'gelu'`` is the exact erf GELU; ``'gelu_new'`` the tanh one."""
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"Unknown hidden_act {name!r}; expected gelu, gelu_new or relu.")


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``rng`` is None or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention with an exact key-padding mask.

    float32 / bfloat16 without attention dropout use ``jax.nn.dot_product_attention``. float64
    (whose softmax ``dot_product_attention`` would compute in float32) and attention dropout use
    an explicit softmax in the input dtype. Masked keys get the dtype's most negative value, so
    they receive exactly zero weight whenever a row has at least one real key.

    Args:
      q, k, v: ``(B, T, nh, hd)``.
      key_mask: ``(B, T)`` bool, True for real tokens.
      dropout_rate: attention-probability dropout rate, used only with ``dropout_rng``.
      dropout_rng: PRNG key, or None for deterministic attention.

    Returns:
      ``(B, T, nh, hd)``.
    """
    use_dropout = dropout_rng is not None and dropout_rate > 0.0
    if q.dtype != jnp.float64 and not use_dropout:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, T) broadcast over heads and queries
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, nh, T, T)
    neg = jnp.finfo(scores.dtype).min
    scores = jnp.where(key_mask[:, None, None, :], scores, neg)
    probs = jax.nn.softmax(scores.astype(jnp.promote_types(q.dtype, jnp.float32)), axis=-1)
    probs = probs.astype(q.dtype)
    if use_dropout:
        probs = dropout(probs, dropout_rate, dropout_rng)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, T, nh, hd)
