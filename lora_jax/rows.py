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

__all__ = [
    "MIN_SAVING",
    "by_length",
    "by_length_fn",
    "even_blocks",
    "length_groups",
    "map_rows",
    "map_rows_fn",
    "num_rows",
    "take_rows",
    "token_lengths",
]


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


def even_blocks(n: int, batch_size: int, multiple: int = 1) -> tuple[int, int]:
    """``(num_blocks, rows)``: ``ceil(n / batch_size)`` blocks of ``rows <= batch_size``, as even
    as possible (32 rows at ``batch_size=64`` are one block of 32; 1000 are 16 of 63), with
    ``rows`` rounded up to a multiple of ``multiple`` (e.g. the devices a block is split over:
    1000 rows at ``batch_size=64, multiple=8`` are 16 blocks of 64)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    num_blocks = max(1, -(-n // batch_size))
    rows = -(-n // num_blocks)
    return num_blocks, -(-rows // multiple) * multiple


def take_rows(tree: PyTree, start: int, size: int, n: int | None = None) -> PyTree:
    """Rows ``start:start+size`` of every array, padded by repeating row ``n - 1``.

    Static shapes for the last, short block. Works on numpy and jax arrays (host-side index).
    """
    n = num_rows(tree) if n is None else n
    idx = np.minimum(np.arange(start, start + size), n - 1)
    return jax.tree.map(lambda a: a[idx] if np.ndim(a) >= 1 else a, tree)


def map_rows(
    fn: Callable[[PyTree], jax.Array], data: Mapping, batch_size: int, multiple: int = 1
) -> jax.Array:
    """``fn`` over the rows of ``data`` in even padded blocks (``lax.map``), ``[N, ...]``.

    Traceable (call it inside ``jax.jit``): the blocks run one after another in one program, so
    memory is one block's. ``fn(block) -> [rows, ...]`` maps a batch dict of ``rows`` rows, a
    multiple of ``multiple`` (:func:`even_blocks`).

    Example (5 rows, blocks of at most 2: 3 blocks of 2, the last padded with row 4):
      >>> import jax.numpy as jnp
      >>> map_rows(lambda b: 2 * b["x"], {"x": jnp.arange(5.0)}, batch_size=2).tolist()
      [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    n = num_rows(data)
    num_blocks, rows = even_blocks(n, batch_size, multiple)
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


# -- rows sorted by token length ------------------------------------------------------------------


def token_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """Each row's length: its last attended position + 1 (0 for a row with none), ``[...]``.

    ``attention_mask`` ``[..., T]``; the columns after a row's length are padding it can lose.
    """
    mask = np.asarray(attention_mask) > 0
    width = mask.shape[-1]
    return np.where(mask.any(-1), width - np.argmax(mask[..., ::-1], axis=-1), 0)


def length_groups(
    lengths: np.ndarray, batch_size: int, width: int, multiple: int = 8, min_saving: float = 0
) -> list[tuple[int, int, int]]:
    """``[(start, stop, T)]``: rows of non-decreasing ``lengths`` in blocks, grouped by length.

    The rows are cut into the blocks of :func:`even_blocks`; each block is padded to its
    longest row rounded up to ``multiple`` (at most ``width``), and consecutive blocks of one
    padded length form one group (so each length is one group: one compiled shape). A group
    whose own length would save fewer than ``min_saving`` row-tokens (rows x the tokens by
    which it is shorter than the next group) joins the next group instead, since another
    compiled shape would cost more than it saves.

    >>> length_groups(np.array([3, 5, 9, 9, 17]), batch_size=2, width=24)
    [(0, 2, 8), (2, 4, 16), (4, 5, 24)]
    >>> length_groups(np.array([3, 5, 9, 9, 17]), batch_size=2, width=24, min_saving=20)
    [(0, 2, 8), (2, 5, 24)]
    """
    n = len(lengths)
    num_blocks, rows = even_blocks(n, batch_size)
    groups: list[tuple[int, int, int]] = []
    for start in range(0, num_blocks * rows, rows):
        stop = min(start + rows, n)
        length = min(width, -(-max(int(lengths[stop - 1]), 1) // multiple) * multiple)
        if groups and groups[-1][2] == length:
            groups[-1] = (groups[-1][0], stop, length)
        else:
            groups.append((start, stop, length))
    kept = groups[-1:]  # from the longest down: join the next group unless it pays
    for start, stop, length in reversed(groups[:-1]):
        _, next_stop, next_length = kept[-1]
        if (stop - start) * (next_length - length) < min_saving:
            kept[-1] = (start, next_stop, next_length)
        else:
            kept.append((start, stop, length))
    return kept[::-1]


# A compile of a small encoder's forward (MiniLM-L6) costs about as much CPU time as running
# 4,000-5,000 row-tokens through it; a shorter group must save more than this to be its own.
MIN_SAVING = 4096


def by_length(
    fn: Callable[[dict], PyTree],
    data: Mapping,
    batch_size: int,
    *,
    members: bool = False,
    out_axis: int | None = None,
    multiple: int = 8,
    copies: int = 1,
    min_saving: float | None = None,
) -> PyTree:
    """``fn(data)`` computed on the rows sorted by token length, each group padded to its own
    longest row; the outputs are put back in the original order.

    Rows are sorted by :func:`token_lengths` and cut as :func:`length_groups` says; each group
    is one call ``fn(group)``, with its token arrays (those shaped like ``attention_mask``) cut
    to the group's length, so each distinct length compiles once. Exact when ``fn`` maps each
    row on its own and the padding after a row's last attended token does not change its
    outputs (masked attention: this library's encoders and readouts).

    Args:
      fn: ``batch -> outputs``, the rows of ``outputs`` on ``out_axis`` (e.g. a jitted
        ``programs.make_predict`` with its parameters bound).
      data: a batch dict with ``attention_mask`` ``[N, T]``; with ``members``, every array has
        a leading member axis (``[n, N, T]``) and each member's rows are sorted on their own
        (a block's length is then its longest over the members).
      batch_size: the most rows of a block (as ``map_rows``).
      members: see ``data``.
      out_axis: the rows' axis in the outputs; default: the data's (0, or 1 with ``members``).
      multiple: group lengths are multiples of this (few distinct shapes).
      copies: how many times ``fn`` computes each row (e.g. once per member of a vectorized
        predict of shared data), for the saving of a group.
      min_saving: the row-tokens (counting copies and members) a group must save to get its
        own length, and so its own compile (:func:`length_groups`); 0 keeps every length.
        Default: the module's ``MIN_SAVING``.

    Returns:
      ``fn`` 's outputs for all N rows, in the order of ``data``.
    """
    row_axis = 1 if members else 0
    out_axis = row_axis if out_axis is None else out_axis
    mask = np.asarray(data["attention_mask"])
    lengths = token_lengths(mask)  # (N,) or (n, N)
    order = np.argsort(lengths, axis=-1, kind="stable")
    longest = np.take_along_axis(lengths, order, axis=-1)
    longest = longest.max(0) if members else longest  # (N,), non-decreasing
    per_row = copies * (mask.shape[0] if members else 1)  # computations of one row index
    min_saving = MIN_SAVING if min_saving is None else min_saving

    def take(x, rows, length):
        x = np.asarray(x)
        if x.ndim <= row_axis:  # scalars (and per-member scalars) are not rows
            return x
        tokens = x.shape == mask.shape
        if members:
            x = np.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)
        else:
            x = x[rows]
        return x[..., :length] if tokens else x

    parts = [
        fn({k: take(v, order[..., start:stop], length) for k, v in data.items()})
        for start, stop, length in length_groups(
            longest, batch_size, mask.shape[-1], multiple, min_saving / per_row
        )
    ]
    inverse = np.argsort(order, axis=-1)

    def restore(*xs):
        out = jnp.concatenate(xs, axis=out_axis)
        if inverse.ndim == 1:
            return jnp.take(out, inverse, axis=out_axis)
        index = inverse.reshape(inverse.shape + (1,) * (out.ndim - 2))
        return jnp.take_along_axis(out, index, axis=out_axis)

    return jax.tree.map(restore, *parts)


def by_length_fn(
    fn: Callable, batch_size: int, *, members: bool = False, out_axis: int | None = None
) -> Callable:
    """``call(*args, data)``: ``fn(*args, data)`` computed by :func:`by_length` (its keyword
    arguments as there) when ``data`` has an ``attention_mask``, else called as is.

    Host-side (not traceable): wrap a jitted ``fn``, e.g. ``programs.make_predict`` 's.
    """

    def call(*args):
        *params, data = args
        if "attention_mask" not in data:
            return fn(*args)
        return by_length(
            lambda part: fn(*params, part), data, batch_size, members=members, out_axis=out_axis
        )

    return call
