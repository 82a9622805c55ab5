"""Per-example Jacobians computed once per row and reused by every kernel block they enter.

For JACOBIAN_CONTRACTION with ``vmap_axes=0`` the blocked kernel of neural-tangents recomputes
the Jacobians of both sides of every block: a symmetric ``N x N`` kernel in ``b``-row blocks
costs ``N * N / b`` Jacobian rows instead of ``N``, and a 1,000 x 64 test x train kernel
recomputes the 64 train Jacobians for every test block. Here the Jacobians of ``x2`` (of
``x1`` when symmetric) are computed once, block by block, and kept; each block of ``x1`` is
differentiated once and contracted with all of them. Same kernel, same layout as nt's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.rows import take_rows
from ntk._programs import compiled
from ntk.model_fn import check_outputs

PyTree = Any

__all__ = ["contraction_program", "jacobian_bytes", "jacobian_program", "reused_kernel"]


def jacobian_program(f: Callable, fn_key: tuple, x: PyTree, params: PyTree) -> Any:
    """Compiled ``(params, x) -> J``: per leaf ``[b, K, P_leaf]``, the per-example Jacobians."""

    def jac(params, x):
        def one(p, row):  # one example (no batch axis) -> (K,)
            return f(p, jax.tree.map(lambda a: a[None], row))[0]

        j = jax.vmap(jax.jacrev(one), in_axes=(None, 0))(params, x)  # leaves (b, K, *shape)
        return [leaf.reshape(*leaf.shape[:2], -1) for leaf in jax.tree.leaves(j)]

    def lower():
        check_outputs(jax.eval_shape(f, params, x), x, where="f")
        return jax.jit(jac).lower(params, x)

    return compiled(f, fn_key, ("jacobian",), lower, (params, x))


def contraction_program(trace: tuple, diag: tuple, ja: list, jb: list) -> Any:
    """Compiled ``(ja, jb) -> block``: ``sum_leaves einsum`` in nt's layout (``[b1, b2, K, K]``,
    ``[b1, b2]`` traced: the mean over k, ``[b1, b2, K]`` diagonal)."""
    if 1 in trace:
        spec, scale = "akp,bkp->ab", 1.0 / ja[0].shape[1]
    elif 1 in diag:
        spec, scale = "akp,bkp->abk", 1.0
    else:
        spec, scale = "akp,blp->abkl", 1.0

    def contract(ja, jb):
        out = sum(jnp.einsum(spec, a, b) for a, b in zip(ja, jb, strict=True))
        return out * scale if scale != 1.0 else out

    key = ("content", "contract", spec)  # the program is fixed by spec and the shapes
    return compiled(contract, key, (), lambda: jax.jit(contract).lower(ja, jb), (ja, jb))


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
) -> None:
    """Computes every block with reused Jacobians; ``place(block, i, j)`` stores each.

    ``jobs(pairs)`` wraps the list of block pairs (a progress bar). ``x2=None``: the upper
    triangle of ``x1`` with itself.
    """
    symmetric = x2 is None
    rows2 = x1 if symmetric else x2
    n1 = np.shape(jax.tree.leaves(x1)[0])[0]
    n2 = np.shape(jax.tree.leaves(rows2)[0])[0]
    b1, b2 = (sizes[0], sizes[0]) if symmetric else sizes
    kept = {}
    for j in range(0, n2, b2):
        xb = take_rows(rows2, j, b2, n2)
        kept[j] = jacobian_program(f, fn_key, xb, params)(params, xb)
    pairs = [(i, j) for i in range(0, n1, b1) for j in range(0, n2, b2) if not symmetric or j >= i]
    current = None
    for i, j in jobs(pairs):
        if symmetric:
            ja = kept[i]
        elif current is None or current[0] != i:
            xa = take_rows(x1, i, b1, n1)
            current = (i, jacobian_program(f, fn_key, xa, params)(params, xa))
        ja = kept[i] if symmetric else current[1]
        block = contraction_program(trace, diag, ja, kept[j])(ja, kept[j])
        place(np.asarray(block), i, j)
