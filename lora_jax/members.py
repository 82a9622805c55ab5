"""The leading member axis: several runs' pytrees stacked as one (a job of ``n`` members).

A training job holds ``n`` independent runs (members) in one state whose every leaf has a
leading ``[n, ...]`` axis; a single run is a job of one. These helpers stack, index and select
along that axis.

>>> import jax.numpy as jnp
>>> from lora_jax import members
>>> tree = members.stack([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])
>>> tree["w"].shape, members.count(tree), members.member(tree, 1)["w"].tolist()
((2, 2), 2, [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks same-structured pytrees on a new leading member axis: leaves ``[n, ...]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree: PyTree, i: int) -> PyTree:
    """Member ``i`` of a stacked pytree (leaves ``[n, ...]`` -> ``[...]``)."""
    return jax.tree.map(lambda x: x[i], tree)


def count(tree: PyTree) -> int:
    """``n``, the length of the leading member axis of a stacked pytree."""
    return int(jax.tree.leaves(tree)[0].shape[0])


def select(pick: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per member: ``new`` where ``pick`` [n] is True, else ``old`` (leaves ``[n, ...]``)."""
    return jax.tree.map(
        lambda a, b: jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b), new, old
    )


def pad(tree: PyTree, n: int) -> PyTree:
    """``tree`` grown to ``n`` members by copies of member 0 (idle members: a mesh splits a job
    only into equal parts, so a job of 10 on 16 devices runs as 16 whose last 6 are dropped)."""
    if not jax.tree.leaves(tree):  # e.g. no per-member inputs
        return tree
    extra = n - count(tree)
    if extra <= 0:
        return tree
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)]), tree)
