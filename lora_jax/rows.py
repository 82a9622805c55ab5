"""Evaluating a function over N rows in fixed, padded blocks (one compiled shape for any N).

Every place that runs a model over more rows than fit in one call (prediction in
:mod:`lora_jax.train`, cached features in ``experiments``, outputs and kernel blocks in ``ntk``)
cuts the rows the same way: blocks of one static size, the last one padded by repeating the
last real row (a real example, so no all-padding row reaches the model), padding dropped from
the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["even_blocks", "map_rows", "map_rows_fn", "num_rows", "take_rows"]


def num_rows(tree: PyTree, name: str = "data") -> int:
    """The common leading size N of a pytree's arrays (scalars are ignored).

    Raises:
      ValueError: if the arrays disagree on N, or there is none.
    """
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree) if np.ndim(leaf) >= 1}
    if len(sizes) != 1:
        raise ValueError(
            f"{name} must be a batch dict whose arrays all have the same leading size N; got "
            f"leading sizes {sorted(sizes) or 'none'}."
        )
    return sizes.pop()


def even_blocks(n: int, batch_size: int) -> tuple[int, int]:
    """``(num_blocks, rows)``: ``ceil(n / batch_size)`` blocks of ``rows <= batch_size``, as even
    as possible (32 rows at ``batch_size=64`` are one block of 32; 1000 are 16 of 63)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    num_blocks = max(1, -(-n // batch_size))
    return num_blocks, -(-n // num_blocks)


def take_rows(tree: PyTree, start: int, size: int, n: int | None = None) -> PyTree:
    """Rows ``start:start+size`` of every array, padded by repeating row ``n - 1``.

    Static shapes for the last, short block. Works on numpy and jax arrays (host-side index).
    """
    n = num_rows(tree) if n is None else n
    idx = np.minimum(np.arange(start, start + size), n - 1)
    return jax.tree.map(lambda a: a[idx] if np.ndim(a) >= 1 else a, tree)


def map_rows(fn: Callable[[PyTree], jax.Array], data: Mapping, batch_size: int) -> jax.Array:
    """``fn`` over the rows of ``data`` in even padded blocks (``lax.map``), ``[N, ...]``.

    Traceable (call it inside ``jax.jit``): the blocks run one after another in one program, so
    memory is one block's. ``fn(block) -> [rows, ...]`` maps a batch dict of ``rows`` rows.

    Example (5 rows, blocks of at most 2: 3 blocks of 2, the last padded with row 4):
      >>> import jax.numpy as jnp
      >>> map_rows(lambda b: 2 * b["x"], {"x": jnp.arange(5.0)}, batch_size=2).tolist()
      [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    n = num_rows(data)
    num_blocks, rows = even_blocks(n, batch_size)
    idx = np.minimum(np.arange(num_blocks * rows), n - 1)

    def blocks(x):
        if np.ndim(x) < 1:
            return jnp.broadcast_to(x, (num_blocks,))
        return jnp.asarray(x)[idx].reshape(num_blocks, rows, *np.shape(x)[1:])  # (nb, rows, ...)

    out = jax.lax.map(fn, jax.tree.map(blocks, dict(data)))  # (nb, rows, ...)
    return jax.tree.map(lambda o: o.reshape(num_blocks * rows, *o.shape[2:])[:n], out)


def map_rows_fn(f: Callable[[PyTree, PyTree], jax.Array], batch_size: int) -> Callable:
    """Jitted ``(params, data) -> f(params, data)`` computed by :func:`map_rows` in blocks."""
    return jax.jit(lambda params, data: map_rows(lambda b: f(params, b), data, batch_size))
