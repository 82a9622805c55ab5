"""Per-example Jacobians computed once per row and reused by every kernel block they enter.

For JACOBIAN_CONTRACTION with ``vmap_axes=0`` the blocked kernel of neural-tangents recomputes
the Jacobians of both sides of every block: a symmetric ``N x N`` kernel in ``b``-row blocks
costs ``N * N / b`` Jacobian rows instead of ``N``, and a 1,000 x 64 test x train kernel
recomputes the 64 train Jacobians for every test block. Here the Jacobians of ``x2`` (of
``x1`` when symmetric) are computed once, block by block, and kept; each block of ``x1`` is
differentiated once and contracted with all of them. Same kernel, same layout as nt's.

Layout: a block's Jacobian is, per parameter leaf, K matrices ``[b, P_leaf]`` (row ``i`` of
matrix ``k``: the gradient of output ``k`` of example ``i``), whose row-wise join ``[K * b,
P_leaf]`` makes every contraction a plain 2-D matrix product ``A @ B.T`` per leaf: XLA:CPU runs
those several times faster than the 4-D ``einsum('akp,blp->abkl')`` of nt's ``[b, K, P]``
layout, and faster still as a loop over column slices that stay in cache (:func:`_gram`; see
benchmarks/bench_ntk.py).
A symmetric kernel that is a single block is computed by one *fused* program (gradients and
their Gram matrix together), so XLA frees each leaf's Jacobian once it is contracted and the
``[K * N, P]`` Jacobian is never held whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.rows import num_rows, take_rows
from ntk import _mesh
from ntk._programs import compiled
from ntk.models import check_outputs

PyTree = Any

GRAM_CHUNK = 4096  # columns per slice of a Gram product on CPU (see _gram)

__all__ = [
    "contraction_fn",
    "contraction_program",
    "cross_fn",
    "cross_program",
    "Layout",
    "fused_fn",
    "fused_program",
    "jacobian_bytes",
    "jacobian_fn",
    "jacobian_program",
    "kept_spec",
    "layout",
    "pair_fn",
    "pair_program",
    "reused_kernel",
    "sign_block_fn",
    "sign_block_program",
]


class Layout(NamedTuple):
    """Where a kernel's per-example Jacobians live and how their Gram products run.

    ``chunk``: columns per slice of each Gram product (None: one product; see :func:`_gram`).
    ``sharding``: the placement of every ``[b, P]`` Jacobian matrix (rows over the mesh's data
    axis, columns over its fsdp axis), or None (one device: XLA's choice).
    ``split``: devices along the fsdp axis that splits the parameters (1: not split)."""

    chunk: int | None = GRAM_CHUNK
    sharding: Any = None
    split: int = 1


DEFAULT_LAYOUT = Layout()  # one device's, with the default Gram slices


def layout(mesh: Any, data_axis: str = "data", fsdp_axis: str | None = None) -> Layout:
    """The :class:`Layout` of a kernel on ``mesh`` (None: one device).

    Column slices (:data:`GRAM_CHUNK`) on CPU devices, where slices that stay in cache run
    faster; one product on accelerators, whose matrix units take the long contraction whole,
    and wherever the parameters split over ``fsdp_axis``: a slice of a split column axis gathers
    the whole matrix at every step, while one product multiplies each device's columns and
    reduces the ``[b1, b2]`` partial sums across the axis. On a mesh each Jacobian matrix keeps
    its rows over ``data_axis`` and its columns over ``fsdp_axis``, as the parameters it
    differentiates: left to XLA, the per-example gradients of a split embedding table were
    gathered whole."""
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    size = 1 if mesh is None or fsdp_axis is None else int(mesh.shape[fsdp_axis])
    chunk = GRAM_CHUNK if devices[0].platform == "cpu" and size < 2 else None
    if mesh is None:
        return Layout(chunk)
    spec = PartitionSpec(data_axis, fsdp_axis if size > 1 else None)
    return Layout(chunk, NamedSharding(mesh, spec), size)


def _jacobian_rows(
    f: Callable, params: PyTree, x: PyTree, lay: Layout = DEFAULT_LAYOUT
) -> list[list]:
    """Per leaf, K matrices ``[b, P_leaf]``: row ``i`` of matrix ``k`` is the gradient of output
    ``k`` of example ``i`` (``f(params, x) -> [b, K]``, one example independent of the others),
    placed as ``lay`` says (:func:`layout`).

    One forward pass per example and K backward passes from it (``jax.vjp``), each its own
    (not vmapped over k: XLA:CPU ran a k-batched backward slower). The K matrices stay apart:
    joining them would copy every Jacobian once more; :func:`_gram` joins cache-sized slices."""

    def one_row(p, row):  # one example -> its K outputs, checked
        batch = jax.tree.map(lambda a: a[None], row)
        return check_outputs(f(p, batch), batch, where="f")[0]

    def per_example(p, row):  # one example (no batch axis) -> K gradients
        out, vjp = jax.vjp(lambda p: one_row(p, row), p)
        return [vjp(jnp.zeros_like(out).at[k].set(1))[0] for k in range(out.shape[0])]

    per_k = jax.vmap(per_example, in_axes=(None, 0))(params, x)  # K trees of (b, ...)
    per_k = [[_matrix(g, lay) for g in jax.tree.leaves(grads)] for grads in per_k]
    return [list(parts) for parts in zip(*per_k, strict=True)]


def _matrix(g: jax.Array, lay: Layout) -> jax.Array:
    """One leaf's per-example gradients ``[b, *shape]`` as a ``[b, P]`` matrix placed as ``lay``
    says. The dimension the fsdp axis splits (:func:`ntk._mesh.split_dim`) goes first, so that
    the flat columns split over the axis as the parameter does (flattened in place, a split
    minor dimension, e.g. the 1,024 of a 50,265 x 1,024 table, was gathered whole). Both sides
    of a Gram product are flattened alike, so the kernel does not change."""
    dim = None if lay.split < 2 else _mesh.split_dim(g.shape[1:], lay.split)
    if dim:
        g = jnp.moveaxis(g, 1 + dim, 1)
    g = g.reshape(g.shape[0], -1)
    return g if lay.sharding is None else jax.lax.with_sharding_constraint(g, lay.sharding)


def _columns(parts: list, start: Any, width: int) -> jax.Array:
    """Columns ``start:start + width`` of the row-wise join of ``parts`` (``[b, P]`` each):
    ``[sum b, width]``."""
    cols = [jax.lax.dynamic_slice_in_dim(m, start, width, 1) for m in parts]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=0)


def _gram(pa: list, pb: list, chunk: int | None = GRAM_CHUNK) -> jax.Array:
    """``A @ B.T`` of the row-wise joins ``A``, ``B`` of ``pa``, ``pb`` (``[b, P]`` each): a
    loop over column slices of ``chunk`` (None: one product, see :func:`layout`). XLA:CPU
    runs one product with a long contraction and a small output well below its GEMM rate;
    slices that stay in cache run near it, and joining slices instead of whole matrices copies
    nothing large (benchmarks/bench_ntk.py)."""
    p = pa[0].shape[1]
    n = 0 if chunk is None else p // chunk
    if n < 2:
        return _columns(pa, 0, p) @ _columns(pb, 0, p).T

    def body(i, acc):
        start = i * chunk
        return acc + _columns(pa, start, chunk) @ _columns(pb, start, chunk).T

    rows_a, rows_b = (sum(m.shape[0] for m in parts) for parts in (pa, pb))
    acc = jax.lax.fori_loop(0, n, body, jnp.zeros((rows_a, rows_b), pa[0].dtype))
    rest = n * chunk
    return acc if rest == p else acc + _columns(pa, rest, p - rest) @ _columns(pb, rest, p - rest).T


def _contract(
    ja: list, jb: list, trace: tuple, diag: tuple, lay: Layout = DEFAULT_LAYOUT
) -> jax.Array:
    """``sum_leaves A @ B.T`` of two blocks' Jacobians (per leaf, K ``[b, P]`` matrices; see
    :func:`_jacobian_rows`), in nt's layout: ``[b1, b2, K, K]``, or ``[b1, b2]`` traced (the
    mean over k), or ``[b1, b2, K]`` diagonal, as ``lay`` runs it (:func:`layout`)."""
    b1, b2, num_outputs = ja[0][0].shape[0], jb[0][0].shape[0], len(ja[0])
    if 1 in trace or 1 in diag:  # only the (k, k) blocks

        def block_kk(k):  # (b1, b2): output k of x1 with output k of x2
            return sum(_gram([a[k]], [b[k]], lay.chunk) for a, b in zip(ja, jb, strict=True))

        per_k = jnp.stack([block_kk(k) for k in range(num_outputs)], axis=-1)  # (b1, b2, K)
        return per_k.mean(-1) if 1 in trace else per_k
    gram = sum(_gram(a, b, lay.chunk) for a, b in zip(ja, jb, strict=True))  # (K b1, K b2)
    return gram.reshape(num_outputs, b1, num_outputs, b2).transpose(1, 3, 0, 2)


def _sign(j: list, on: bool) -> list:
    """``sign`` of every Jacobian matrix when ``on`` (the SignGD kernels), else ``j``."""
    return [[jnp.sign(m) for m in parts] for parts in j] if on else j


def jacobian_fn(f: Callable, sign: bool = False, lay: Layout = DEFAULT_LAYOUT) -> Callable:
    """``(params, x) -> J``: per leaf, K ``[b, P_leaf]`` per-example Jacobians (their signs
    with ``sign``), placed as ``lay`` says (:func:`layout`)."""
    return lambda p, x: _sign(_jacobian_rows(f, p, x, lay), sign)


def jacobian_program(
    f: Callable,
    fn_key: tuple,
    x: PyTree,
    params: PyTree,
    sign: bool = False,
    lay: Layout = DEFAULT_LAYOUT,
) -> Any:
    """Compiled :func:`jacobian_fn`."""

    def lower():
        return jax.jit(jacobian_fn(f, sign, lay)).lower(params, x)

    what = ("jacobian", "sign") if sign else ("jacobian",)
    return compiled(f, fn_key, (*what, *_layout_key(lay)), lower, (params, x))


def contraction_fn(trace: tuple, diag: tuple, lay: Layout = DEFAULT_LAYOUT) -> Callable:
    """``(ja, jb) -> block`` (see :func:`_contract`)."""

    def contract(ja, jb):
        return _contract(ja, jb, trace, diag, lay)

    return contract


def contraction_program(
    trace: tuple, diag: tuple, ja: list, jb: list, lay: Layout = DEFAULT_LAYOUT
) -> Any:
    """Compiled ``(ja, jb) -> block`` (see :func:`_contract`)."""

    contract = contraction_fn(trace, diag, lay)
    key = ("content", "contract", trace, diag, *_layout_key(lay))  # fixed by these and shapes
    return compiled(contract, key, (), lambda: jax.jit(contract).lower(ja, jb), (ja, jb))


def fused_fn(
    f: Callable,
    trace: tuple,
    diag: tuple,
    signs: tuple[bool, bool] = (False, False),
    lay: Layout = DEFAULT_LAYOUT,
) -> Callable:
    """``(params, x) -> block``: the kernel of ``x`` with itself in one program (``signs``:
    whether each side's gradients enter through their sign, ``ntk.Kernel.signs``; ``lay``:
    as :func:`layout`)."""

    def kernel(p, x):
        j = _jacobian_rows(f, p, x, lay)
        return _contract(_sign(j, signs[0]), _sign(j, signs[1]), trace, diag, lay)

    return kernel


def fused_program(
    f: Callable,
    fn_key: tuple,
    trace: tuple,
    diag: tuple,
    x: PyTree,
    params: PyTree,
    signs: tuple[bool, bool] = (False, False),
    lay: Layout = DEFAULT_LAYOUT,
) -> Any:
    """Compiled :func:`fused_fn`."""

    def lower():
        return jax.jit(fused_fn(f, trace, diag, signs, lay)).lower(params, x)

    what = ("fused", trace, diag, *_signs_key(signs), *_layout_key(lay))
    return compiled(f, fn_key, what, lower, (params, x))


def _signs_key(signs: tuple[bool, bool]) -> tuple:
    """The program-key part of ``signs``: empty for the SGD kernel (keys as before)."""
    return () if not any(signs) else (("signs", *signs),)


def _layout_key(lay: Layout) -> tuple:
    """The program-key part of ``lay``: empty for one device's default (keys as before)."""
    return () if lay == DEFAULT_LAYOUT else (("layout", lay.chunk, str(lay.sharding)),)


def pair_fn(
    f: Callable,
    trace: tuple,
    diag: tuple,
    n1: int,
    signs: tuple[bool, bool] = (False, False),
    lay: Layout = DEFAULT_LAYOUT,
) -> Callable:
    """``(params, x) -> block``: the kernel of rows ``x[:n1]`` with rows ``x[n1:]`` in one
    program (an ``x1`` and an ``x2`` of one block each, joined): one model to compile, not one
    for each side."""

    def kernel(p, x):
        j = _jacobian_rows(f, p, x, lay)
        ja = [[m[:n1] for m in parts] for parts in j]
        jb = [[m[n1:] for m in parts] for parts in j]
        return _contract(_sign(ja, signs[0]), _sign(jb, signs[1]), trace, diag, lay)

    return kernel


def pair_program(
    f: Callable,
    fn_key: tuple,
    trace: tuple,
    diag: tuple,
    x: PyTree,
    n1: int,
    params: PyTree,
    signs: tuple[bool, bool] = (False, False),
    lay: Layout = DEFAULT_LAYOUT,
) -> Any:
    """Compiled :func:`pair_fn`."""

    def lower():
        return jax.jit(pair_fn(f, trace, diag, n1, signs, lay)).lower(params, x)

    what = ("pair", trace, diag, n1, *_signs_key(signs), *_layout_key(lay))
    return compiled(f, fn_key, what, lower, (params, x))


def cross_fn(
    f: Callable, trace: tuple, diag: tuple, sign: bool = False, lay: Layout = DEFAULT_LAYOUT
) -> Callable:
    """``(params, x, kept) -> [block with kept[0], block with kept[1], ...]``: the Jacobians of
    ``x`` (their signs with ``sign``) contracted with every kept block in one program (they
    are never a program output, so XLA frees each leaf's once it is contracted)."""

    def kernel(p, x, kept):
        j = _sign(_jacobian_rows(f, p, x, lay), sign)
        return [_contract(j, jb, trace, diag, lay) for jb in kept]

    return kernel


def cross_program(
    f: Callable,
    fn_key: tuple,
    trace: tuple,
    diag: tuple,
    x: PyTree,
    kept: list,
    params: PyTree,
    sign: bool = False,
    lay: Layout = DEFAULT_LAYOUT,
) -> Any:
    """Compiled :func:`cross_fn`."""

    def lower():
        return jax.jit(cross_fn(f, trace, diag, sign, lay)).lower(params, x, kept)

    what = ("cross", trace, diag, "sign") if sign else ("cross", trace, diag)
    what = (*what, *_layout_key(lay))
    return compiled(f, fn_key, what, lower, (params, x, kept))


def kept_spec(params: PyTree, rows: int, num_outputs: int) -> list:
    """Shapes and dtypes of one kept block of ``rows`` examples (for compiling ahead)."""
    return [
        [jax.ShapeDtypeStruct((rows, int(np.size(leaf))), jnp.result_type(leaf))] * num_outputs
        for leaf in jax.tree.leaves(params)
    ]


def jacobian_bytes(exe: Any) -> int:
    """Bytes of one block's Jacobians (the program's output)."""
    m = exe.memory_analysis()
    return int(m.output_size_in_bytes) if m is not None else 0


def reused_kernel(
    f: Callable,
    fn_key: tuple,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None,
    sizes: tuple[int, int],
    trace: tuple,
    diag: tuple,
    place: Callable[[np.ndarray, int, int], None],
    jobs: Callable[[list], list],
    prepare: Callable[[PyTree], PyTree] = lambda x: x,
    signs: tuple[bool, bool] = (False, False),
    lay: Layout = DEFAULT_LAYOUT,
) -> None:
    """Computes every block with reused Jacobians; ``place(block, i, j)`` stores each.

    ``jobs(items)`` wraps the work list (a progress bar): the blocks of ``x1`` with ``x2``
    given, the block pairs of the upper triangle of ``x1`` with itself when ``x2=None``.
    ``prepare(block)`` maps each block of rows before it is differentiated (cuts padding).
    ``signs``: whether the gradients of x1 / x2 enter through their sign (``ntk.Kernel``);
    with ``x2=None`` they must agree (a symmetric kernel). ``lay``: as :func:`layout`.
    """
    symmetric = x2 is None
    if symmetric and signs[0] != signs[1]:
        raise ValueError("An asymmetric kernel needs x2: pass x2 = x1 for K(x1, x1).")
    rows2 = x1 if symmetric else x2
    n1 = num_rows(x1)
    n2 = num_rows(rows2)
    b1, b2 = (sizes[0], sizes[0]) if symmetric else sizes
    kept = {}
    for j in range(0, n2, b2):
        xb = prepare(take_rows(rows2, j, b2, n2))
        kept[j] = jacobian_program(f, fn_key, xb, params, signs[1], lay)(params, xb)
    if not symmetric:  # each block of x1: its Jacobians and all its blocks in one program
        starts = list(kept)
        for i in jobs(list(range(0, n1, b1))):
            xa = prepare(take_rows(x1, i, b1, n1))
            exe = cross_program(
                f, fn_key, trace, diag, xa, list(kept.values()), params, signs[0], lay
            )
            for j, block in zip(starts, exe(params, xa, list(kept.values())), strict=True):
                place(block, i, j)
        return
    pairs = [(a, b) for a in range(0, n1, b1) for b in range(a, n2, b2)]
    for i, j in jobs(pairs):
        contract = contraction_program(trace, diag, kept[i], kept[j], lay)
        place(contract(kept[i], kept[j]), i, j)


def sign_block_fn(
    f: Callable,
    trace: tuple,
    diag: tuple,
    signs: tuple[bool, bool],
    lay: Layout = DEFAULT_LAYOUT,
) -> Callable:
    """``(xa, xb, params) -> block`` (``xb`` None: ``xa`` with itself): one block of a kernel
    whose gradients enter through their signs (``ntk.Kernel``), both sides differentiated in the
    program: the per-block path when the kept Jacobians do not fit."""

    def kernel(a, b, p):
        ja = _jacobian_rows(f, p, a, lay)
        jb = ja if b is None else _jacobian_rows(f, p, b, lay)
        return _contract(_sign(ja, signs[0]), _sign(jb, signs[1]), trace, diag, lay)

    return kernel


def sign_block_program(
    f: Callable,
    fn_key: tuple,
    trace: tuple,
    diag: tuple,
    xa: PyTree,
    xb: PyTree | None,
    params: PyTree,
    signs: tuple[bool, bool],
    lay: Layout = DEFAULT_LAYOUT,
) -> Any:
    """Compiled :func:`sign_block_fn` (``(xa, params) -> block`` when ``xb`` is None)."""

    def lower():
        kernel = sign_block_fn(f, trace, diag, signs, lay)
        if xb is None:
            return jax.jit(lambda a, p: kernel(a, None, p)).lower(xa, params)
        return jax.jit(kernel).lower(xa, xb, params)

    what = ("block", trace, diag, *_signs_key(signs), *_layout_key(lay))
    return compiled(f, fn_key, what, lower, (xa, xb, params))
