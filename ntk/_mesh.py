"""Kernel rows on a device mesh: the examples of every block split over the ``data`` axis.

A kernel block's work is per example (its rows' Jacobians) plus a contraction over the
parameters, so splitting the rows of ``x1`` / ``x2`` over the devices of the mesh's ``data``
axis and replicating the (differentiated) parameters lets XLA's SPMD partitioner run each
device's rows there; the Gram products of kept Jacobians are partitioned the same way and
the blocks gathered on the host. Rows per block are rounded up to a multiple of the axis size
(the extra rows repeat the last one and are dropped when the block is placed).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.errors import ConfigError
from lora_jax.rows import num_rows, take_rows

PyTree = Any

__all__ = ["axis_size", "check_mesh", "replicate_on", "rows_on_mesh"]


def check_mesh(mesh: Mesh | None, axis: str) -> None:
    """Raises ConfigError unless ``mesh`` is None or has the axis ``axis``, all addressable."""
    if mesh is None:
        return
    if axis not in mesh.axis_names:
        raise ConfigError(
            f"mesh has axes {mesh.axis_names}, no {axis!r} to split kernel rows over: make it "
            f"with jax.make_mesh(..., ({axis!r}, ...)) or pass data_axis=<one of its axes>."
        )
    if not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        raise ConfigError(
            "empirical_ntk_fn(mesh=...) runs on this process's devices only: pass a mesh of "
            "jax.local_devices() (several processes are not supported for kernels yet)."
        )


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Devices along ``axis`` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[axis])


def rows_on_mesh(x: PyTree, mesh: Mesh, axis: str) -> PyTree:
    """``x`` with its rows padded to a multiple of the axis size and split over ``axis``;
    leaves without rows replicated."""
    n = num_rows(x)
    size = -(-n // axis_size(mesh, axis)) * axis_size(mesh, axis)
    x = take_rows(x, 0, size, n) if size != n else x
    rows = NamedSharding(mesh, PartitionSpec(axis))
    rest = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda a: jax.device_put(np.asarray(a), rows if np.ndim(a) >= 1 else rest), x
    )


def replicate_on(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` replicated on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
