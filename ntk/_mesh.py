"""Kernel rows on a device mesh: the examples of every block split over the ``data`` axis.

A kernel block's work is per example (its rows' Jacobians) plus a contraction over the
parameters, so splitting the rows of ``x1`` / ``x2`` over the devices of the mesh's ``data``
axis and replicating the (differentiated) parameters lets XLA's SPMD partitioner run each
device's rows there; the Gram products of kept Jacobians are partitioned the same way and
the blocks gathered on the host. Rows per block are rounded up to a multiple of the axis size
(the extra rows repeat the last one and are dropped when the block is placed).

The mesh may span several processes (``jax.distributed``): every process calls the kernel
function with the same inputs, builds its own devices' shards from them, and receives the
whole kernel (the blocks are gathered across processes), so each process must run the same
calls in the same order.

With an ``fsdp`` axis too, the parameters are split over it instead of replicated (each
leaf along its first dimension the axis size divides, else kept whole): the per-example
gradients come out split the same way, so each device holds its share of the Jacobian
columns, and the partitioner reduces the partial Gram sums across the axis.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax import distributed
from lora_jax.errors import ConfigError
from lora_jax.rows import num_rows, take_rows

PyTree = Any

__all__ = [
    "axis_size",
    "check_mesh",
    "host_params",
    "is_local",
    "param_sharding",
    "params_on_mesh",
    "replicate_on",
    "row_sharding",
    "split_dim",
    "rows_on_mesh",
]


def check_mesh(mesh: Mesh | None, axis: str, fsdp_axis: str | None = None) -> None:
    """Raises ConfigError unless ``mesh`` is None or has the axes named."""
    if mesh is None:
        if fsdp_axis is not None:
            raise ConfigError(f"fsdp_axis={fsdp_axis!r} without a mesh: pass mesh= too.")
        return
    if axis not in mesh.axis_names:
        raise ConfigError(
            f"mesh has axes {mesh.axis_names}, no {axis!r} to split kernel rows over: make it "
            f"with jax.make_mesh(..., ({axis!r}, ...)) or pass data_axis=<one of its axes>."
        )
    if fsdp_axis is not None and (fsdp_axis not in mesh.axis_names or fsdp_axis == axis):
        raise ConfigError(
            f"fsdp_axis={fsdp_axis!r} is not an axis of the mesh {mesh.axis_names} other than "
            f"the rows' {axis!r}: pass another axis, or None to replicate the parameters."
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
    return jax.tree.map(lambda a: _put(a, row_sharding(a, mesh, axis)), x)


def row_sharding(a: Any, mesh: Mesh, axis: str) -> NamedSharding:
    """Where a leaf of a block lives: its rows split over ``axis``, a scalar replicated."""
    return NamedSharding(mesh, PartitionSpec(axis) if np.ndim(a) >= 1 else PartitionSpec())


def replicate_on(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` replicated on every device of ``mesh``."""
    rest = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: _put(a, rest), tree)


def is_local(mesh: Mesh) -> bool:
    """Whether every device of ``mesh`` belongs to this process."""
    return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def host_params(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """``tree`` with leaves that span several processes copied to the host (the same numbers
    on every process), so the blocks can be cut from it; other leaves as they are."""
    if mesh is None or is_local(mesh):
        return tree
    spans = lambda a: isinstance(a, jax.Array) and not a.is_fully_addressable  # noqa: E731
    if not any(spans(a) for a in jax.tree.leaves(tree)):
        return tree
    return jax.tree.map(lambda a: distributed.to_host(a) if spans(a) else a, tree)


def _put(a, sharding: NamedSharding) -> jax.Array:
    """``a`` (the same value on every process) placed with ``sharding``, whose devices may
    belong to several processes: each process builds only its own devices' shards."""
    if sharding.is_fully_addressable or (isinstance(a, jax.Array) and not a.is_fully_addressable):
        return jax.device_put(a, sharding)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def params_on_mesh(tree: PyTree, mesh: Mesh, fsdp_axis: str | None) -> PyTree:
    """The differentiated parameters on ``mesh``: replicated, or with ``fsdp_axis`` each leaf
    split along its first dimension the axis size divides (whole if none does)."""
    return jax.tree.map(lambda a: _put(a, param_sharding(a, mesh, fsdp_axis)), tree)


def param_sharding(a: Any, mesh: Mesh, fsdp_axis: str | None) -> NamedSharding:
    """Where a differentiated parameter lives: replicated, or with ``fsdp_axis`` split along
    its first dimension the axis size divides (whole if none does)."""
    spec = [None] * np.ndim(a)
    if fsdp_axis is not None:
        dim = split_dim(np.shape(a), axis_size(mesh, fsdp_axis))
        if dim is not None:
            spec[dim] = fsdp_axis
    return NamedSharding(mesh, PartitionSpec(*spec))


def split_dim(shape: tuple[int, ...], size: int) -> int | None:
    """The dimension of a parameter of ``shape`` that an fsdp axis of ``size`` devices splits:
    the first one ``size`` divides (None if none does)."""
    return next((d for d, n in enumerate(shape) if n % size == 0), None)
