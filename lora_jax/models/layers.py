"""Pure layer functions over plain parameter dicts: Linear (with fused LoRA), LayerNorm, attention.

Every Linear of every model goes through :func:`dense`, so a LoRA adapter written into a
parameter dict as ``lora_a`` / ``lora_b`` / ``lora_scale`` leaves is applied everywhere without
the model knowing about LoRA.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from lora_jax.errors import ConfigError

Params = Mapping[str, jax.Array]


def embed(p: Params, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` (any shape, int) of an embedding table ``p = {'embedding': [V, H]}``.

    A *compacted* table ``{'embedding': [U, H], 'rows': [U]}`` holds only the rows whose
    (sorted) ids are in ``rows``: the empirical NTK over all weights differentiates only the
    rows a batch reads (``ntk.compact``). Ids missing from ``rows`` read NaN, so a compaction
    that left out a row shows in the result instead of reading a wrong row. Returns
    ``ids.shape + (H,)``.
    """
    table = p["embedding"]
    rows = p.get("rows")
    if rows is None:
        return jnp.take(table, ids, axis=0)
    slot = jnp.minimum(jnp.searchsorted(rows, ids), rows.shape[0] - 1)  # ids.shape
    found = (jnp.take(rows, slot) == ids)[..., None]
    return jnp.where(found, jnp.take(table, slot, axis=0), jnp.nan)


def dense(p: Params, x: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    """Linear layer ``x @ kernel + bias``, plus a fused LoRA update when ``p`` carries one.

    Args:
      p: ``{'kernel': (in, out), 'bias': (out,)}``; optionally ``'lora_a': (in, r)``,
        ``'lora_b': (r, out)`` and ``'lora_scale': ()``, which add
        ``lora_scale * ((x @ lora_a) @ lora_b)`` without forming the merged kernel, and
        ``'lora_dropout': ()``, PEFT's ``lora_dropout`` rate on ``x`` of that term.
      x: ``(..., in)``.
      lora_rng: the key of this call's LoRA dropout mask; None (evaluation) runs no dropout.

    Returns:
      ``(..., out)`` in the dtype of ``x``.
    """
    y = x @ p["kernel"].astype(x.dtype)
    return _lora_and_bias(p, x, y, lora_rng)


def dense_stack(
    ps: Sequence[Params], x: jax.Array, lora_rngs: Sequence[jax.Array | None] | None = None
) -> list[jax.Array]:
    """Several Linear layers of one shape applied to the same ``x`` as a single matmul.

    Equal to ``[dense(p, x) for p in ps]`` (same products, same sums per output element), but
    the kernels are stacked to ``(in, n, out)`` so that the forward pass and the backward input
    gradient are one GEMM each instead of n: narrow GEMMs (MiniLM's 384 wide) run below the
    rate of a wider one, while 768-wide ones already run at full rate (figures:
    ``benchmarks/README.md``, "Measurements behind the layer functions"). Stacking on a new
    axis keeps each kernel's ``out`` axis, and so its sharding, unchanged.

    Args:
      ps: Linear parameter dicts as for :func:`dense`, all with kernels of one shape (in, out).
      x: ``(..., in)``.
      lora_rngs: one LoRA dropout key per entry of ``ps`` (as ``lora_rng`` of :func:`dense`).

    Returns:
      One ``(..., out)`` array per entry of ``ps``.
    """
    kernel = jnp.stack([p["kernel"].astype(x.dtype) for p in ps], axis=1)  # (in, n, out)
    ys = jnp.einsum("...i,ino->...no", x, kernel)  # (..., n, out)
    rngs = [None] * len(ps) if lora_rngs is None else lora_rngs
    return [_lora_and_bias(p, x, ys[..., j, :], rngs[j]) for j, p in enumerate(ps)]


def _lora_and_bias(p: Params, x: jax.Array, y: jax.Array, lora_rng: jax.Array | None) -> jax.Array:
    """Adds the fused LoRA term ``lora_scale * (dropout(x) @ lora_a) @ lora_b`` and the bias.

    The dropout (PEFT's ``lora_dropout``, on the LoRA branch's input only) runs when ``p`` has a
    ``lora_dropout`` rate (``lora.apply(..., dropout=True)`` puts it there) and a key is given.
    """
    if "lora_a" in p:
        if "lora_dropout" in p:
            x = dropout(x, p["lora_dropout"], lora_rng)
        # On rows flattened to (tokens, in): the gradient of lora_a is then one GEMM
        # contracting one token axis, which XLA:CPU runs without transposing x first. The
        # rank-r branch runs in at least float32 (the factors' own dtype), so under a bfloat16
        # compute dtype the factors' gradients are formed, and all-reduced over a data-parallel
        # mesh, in float32 (the rank-r products cost r / out of the base matmul).
        acc = jnp.promote_types(x.dtype, jnp.float32)
        rows = x.reshape(-1, x.shape[-1]).astype(acc)
        low = (rows @ p["lora_a"].astype(acc)) @ p["lora_b"].astype(acc)
        y = y + (p["lora_scale"].astype(acc) * low).astype(y.dtype).reshape(y.shape)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis; statistics in at least float32 for bfloat16 inputs.

    The derivative is written by hand (:func:`_layer_norm_jvp`); its docstring says why it
    divides by the standard deviation, which keeps the backward pass linear in depth on XLA:CPU.

    Args:
      p: ``{'scale': (H,), 'bias': (H,)}``.
      x: ``(..., H)``.
      eps: variance epsilon (HF ``layer_norm_eps``).
    """
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y = _layer_norm_core(x.astype(stat_dtype), eps)
    y = y * p["scale"].astype(stat_dtype) + p["bias"].astype(stat_dtype)
    return y.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _layer_norm_core(x: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over the last axis (no affine part)."""
    return _normalize(x, eps)[0]


def _normalize(x, eps):
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    std = jnp.sqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
    return xc / std, std


@_layer_norm_core.defjvp
def _layer_norm_jvp(eps, primals, tangents):
    """d xhat = (dx - mean(dx) - xhat * mean(dx * xhat)) / std, linear in dx.

    A custom JVP (not a VJP) so that forward mode (the NTK tools' ``jvp``) works too; JAX
    transposes this linear rule for the backward pass.

    The division by ``std`` (not a multiplication by ``1 / std``) is deliberate. XLA's fusion
    pass duplicates chains of cheap elementwise ops into every consumer. With a multiplication,
    the backward residual-stream cotangent of layer ``l`` stayed an unmaterialized expression of
    all the GEMM outputs above it, and was recomputed inside each of its consumer fusions. That
    made the backward pass quadratic in depth: the fusions of the bottom layer cost over a
    hundred times those of the top one. XLA does not duplicate a divide (an "expensive" op), so
    each LayerNorm ends the chain (`tests/test_compiled_graph.py` guards it; figures:
    ``benchmarks/README.md``, "Measurements behind the layer functions").
    """
    (x,), (dx,) = primals, tangents
    xhat, std = _normalize(x, eps)
    mean_dx = dx.mean(-1, keepdims=True)
    mean_dxx = (dx * xhat).mean(-1, keepdims=True)
    return xhat, (dx - mean_dx - xhat * mean_dxx) / std


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, ``x Phi(x) = x/2 * (1 + erf(x/sqrt 2))``, as HF's ``gelu``.

    Written out, with its derivative ``Phi(x) + x phi(x)`` by hand (a custom JVP, so forward
    mode works too), rather than ``jax.nn.gelu(approximate=False)``: same values, and XLA:CPU
    compiles this form's forward + backward to faster code (figures: ``benchmarks/README.md``,
    "Measurements behind the layer functions").
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@gelu_exact.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
    pdf = jnp.asarray(_INV_SQRT_2PI, x.dtype) * jnp.exp(-0.5 * x * x)
    return x * cdf, (cdf + x * pdf) * dx


def activation(name: str, x: jax.Array) -> jax.Array:
    """HF ``hidden_act``: ``'gelu'`` is the exact erf GELU; ``'gelu_new'`` the tanh one."""
    if name == "gelu":
        return gelu_exact(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "tanh":
        return jnp.tanh(x)
    raise ConfigError(f"Unknown hidden_act {name!r}; expected gelu, gelu_new, relu or tanh.")


def dropout(x: jax.Array, rate: float | jax.Array, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``rng`` is None or ``rate`` is 0.

    ``rate`` may be a traced scalar (a ``lora_dropout`` leaf of params passed through jit).
    """
    if rng is None or (isinstance(rate, int | float) and rate == 0.0):
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

    Written with two einsums and a softmax computed in at least float32 (so bfloat16 inputs get
    float32 statistics and float64 stays float64). This is deliberately not
    ``jax.nn.dot_product_attention``, whose forward + backward on XLA:CPU is slower than this
    form's (figures: ``benchmarks/README.md``, "Measurements behind the layer functions"), and
    which computes its softmax in float32 even for float64 inputs. Masked keys get
    the dtype's most negative value, so they receive exactly zero weight whenever a row has at
    least one real key.

    Args:
      q, k, v: ``(B, T, nh, hd)``.
      key_mask: ``(B, T)`` bool, True for real tokens.
      dropout_rate: attention-probability dropout rate, used only with ``dropout_rng``.
      dropout_rng: PRNG key, or None for deterministic attention.

    Returns:
      ``(B, T, nh, hd)``.
    """
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)  # (B, nh, T, T)
    return attend(scores, key_mask[:, None, None, :], v, dropout_rate, dropout_rng)


def attend(
    scores: jax.Array,
    mask: jax.Array,
    v: jax.Array,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Masked softmax of attention ``scores`` and the weighted sum of ``v``.

    Masked entries get the dtype's most negative value (as HF's ``masked_fill``), so a row with
    at least one real key gives masked keys exactly zero weight, and a fully masked row is
    uniform. The softmax runs in at least float32.

    Args:
      scores: ``(B, nh, Tq, Tk)`` attention logits.
      mask: bool, broadcastable to ``scores``; True where attending is allowed.
      v: ``(B, Tk, nh, hd)`` values.
      dropout_rate: attention-probability dropout rate, used only with ``dropout_rng``.
      dropout_rng: PRNG key, or None for deterministic attention.

    Returns:
      ``(B, Tq, nh, hd)``.
    """
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = softmax(scores.astype(jnp.promote_types(v.dtype, jnp.float32)))
    probs = dropout(probs.astype(v.dtype), dropout_rate, dropout_rng)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, Tq, nh, hd)


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """``jax.nn.softmax(x, axis=-1)``, with its max taken by :func:`last_axis_max`.

    The same operations in the same order as ``jax.nn.softmax`` (``exp(x - max)`` over its
    sum), so the same values; and its derivative rule, ``y * (dx - sum(y * dx))``. Only the
    max differs in how it is computed: XLA:CPU rewrites a max reduction over more than 32
    elements into a ``reduce-window`` that is far slower than the elementwise form (see
    ``benchmarks/README.md``, "Where a step's time goes").
    """
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(last_axis_max(x)))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def last_axis_max(x: jax.Array) -> jax.Array:
    """``jnp.max(x, axis=-1, keepdims=True)`` as a halving tree of elementwise maxima.

    A max is exact in any order, so the value is the reduction's. ``x`` ``(..., T)`` ->
    ``(..., 1)``; an odd remainder is carried to the next level.
    """
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        pairs = jnp.maximum(x[..., :half], x[..., half : 2 * half])
        x = jnp.concatenate([pairs, x[..., 2 * half :]], axis=-1) if x.shape[-1] % 2 else pairs
    return x


def block_shapes(
    prefix: str, projections: Sequence[str], *, hidden: int, intermediate: int
) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of one transformer block's parameters (HF's BERT layer layout).

    Args:
      prefix: the block's path, e.g. ``'roberta.encoder.layer.0'``.
      projections: the attention's input projections under ``{prefix}.attention.self``, each
        ``(hidden, hidden)`` + bias, e.g. ``('query', 'key', 'value')``.
      hidden, intermediate: the residual width H and the feed-forward width I.
    """
    H, I = hidden, intermediate
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int) -> None:
        shapes[f"{prefix}.{name}.kernel"], shapes[f"{prefix}.{name}.bias"] = (n_in, n_out), (n_out,)

    def norm(name: str) -> None:
        shapes[f"{prefix}.{name}.scale"], shapes[f"{prefix}.{name}.bias"] = (H,), (H,)

    for name in projections:
        linear(f"attention.self.{name}", H, H)
    linear("attention.output.dense", H, H)
    norm("attention.output.LayerNorm")
    linear("intermediate.dense", H, I)
    linear("output.dense", I, H)
    norm("output.LayerNorm")
    return shapes


def mlm_head_shapes(
    paths: tuple[str, str, str, str | None], *, n_in: int, width: int, vocab: int, tied: bool
) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of an MLM head's parameters (as :func:`dense` and
    :func:`layer_norm` read them).

    Args:
      paths: ``(transform, norm, bias, decoder)``: the transform dense layer
        (``{transform}.kernel`` ``(n_in, width)``, ``{transform}.bias``), its LayerNorm
        (``{norm}.scale``, ``{norm}.bias``, ``(width,)``), the output bias's full path
        ``(vocab,)``, and the untied decoder kernel's full path ``(width, vocab)`` (None for a
        head that is always tied).
      n_in, width, vocab: the hidden width, the transform's width, the vocabulary size.
      tied: the decoder is the word-embedding matrix (no decoder kernel).
    """
    transform, norm, bias, decoder = paths
    shapes = {
        f"{transform}.kernel": (n_in, width),
        f"{transform}.bias": (width,),
        f"{norm}.scale": (width,),
        f"{norm}.bias": (width,),
        bias: (vocab,),
    }
    if decoder is not None and not tied:
        shapes[decoder] = (width, vocab)
    return shapes
