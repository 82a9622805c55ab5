"""The programs a kernel on a mesh runs, for compiling ahead (``experiments.plan --ntk``).

:func:`kernel_programs` lists the compiled programs ``empirical_ntk_fn(..., mesh=mesh)`` runs
for a kernel of ``x1`` and ``x2``, with how often each runs, as functions that lower them for
``jax.ShapeDtypeStruct`` inputs: compiled for compile-only devices
(:mod:`lora_jax.topologies`), they tell memory per device, FLOPs and collectives of a kernel on
a TPU slice or GPU node without one. The programs are built from the same kernel bodies
(:mod:`ntk._jacobians`, :func:`ntk.kernel.block_fn`), blocks and placements
(:mod:`ntk._mesh`: rows over ``data_axis``, parameters replicated or split over ``fsdp_axis``)
as the kernel's own, embedding tables compacted as :mod:`ntk.compact` cuts them when the
caller says how many rows each keeps (:func:`compacted_tables`). Two differences, both upper
bounds or explicit: the rows are taken at their full length (a run cuts each block to its
longest row), and the weights the model closes over are an argument (``base``), placed like
the parameters, instead of constants, since on a pod they are an array on the mesh.

Example (a sketch: ``output_fn``, the shapes and ``mesh`` are the caller's):
  >>> g = lambda base, adapters, x: output_fn(lora.apply(base, adapters, cfg), x)  # doctest: +SKIP
  >>> progs = kernel_programs(g, base, adapters, x1, x2, mesh=mesh)  # doctest: +SKIP
  >>> [(p.name, p.runs, p.compile().memory_analysis()) for p in progs]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lora_jax import params as params_lib
from lora_jax.errors import ConfigError
from ntk import _jacobians, _mesh
from ntk.compact import ROWS_PREFIX, compact_fn, compactable_tables, kept_rows
from ntk.kernel import Axes, NtkImplementation, _reuse_jacobians, block_fn, kernel_options
from ntk.optimizer import Kernel

PyTree = Any

__all__ = ["KernelProgram", "compacted_tables", "kernel_programs"]


class KernelProgram(NamedTuple):
    """One program of a kernel: its name, ``compile()`` (memoized), and its runs per kernel."""

    name: str  # e.g. "jacobian x2 (64 rows)"
    compile: Callable[[], Any]  # -> jax.stages.Compiled
    runs: int


def _rows(x: PyTree) -> int:
    return int(jax.tree.leaves(x)[0].shape[0])


def _block(x: PyTree, rows: int, mesh: Mesh, axis: str) -> PyTree:
    """A block of ``rows`` rows of ``x`` (shapes only), its rows split over ``axis``."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            (rows, *a.shape[1:]), a.dtype, sharding=_mesh.row_sharding(a, mesh, axis)
        ),
        x,
    )


def compacted_tables(
    params: PyTree, embedding_rows: np.ndarray | None, distinct_ids: int, sequence_length: int
) -> dict[str, int]:
    """The embedding tables a kernel compacts (:mod:`ntk.compact`) and the rows each keeps, for
    :func:`kernel_programs` ``(compacted=...)``.

    Args:
      params: the differentiated parameters (nested dict; shapes suffice).
      embedding_rows: ``ModelInfo.embedding_rows`` of the model (None: nothing compacted).
      distinct_ids: distinct word ids the kernel's rows read, the model's extra rows included
        (counted from the data, or bounded by ``rows * sequence_length + extra``).
      sequence_length: tokens per row.

    Returns:
      ``{dotted path: rows kept}`` (empty when the model names no embedding rows).
    """
    flat = params_lib.flatten(params) if isinstance(params, dict) else {}
    return {
        path: kept_rows(path, int(flat[path].shape[0]), distinct_ids, sequence_length)
        for path in compactable_tables(embedding_rows, params)
    }


def _compacted(g: Callable, params: PyTree, x1: PyTree, x2: PyTree | None, tables):
    """``g``, ``params``, ``x1`` and ``x2`` as the kernel runs them with ``tables``
    (``{path: rows}``) compacted: each table cut to its rows, each batch carrying the rows'
    ids (``ntk.compact.compact_block``), ``g`` reading them (``ntk.compact.compact_fn``)."""
    flat = params_lib.flatten(params) if isinstance(params, dict) else {}
    unknown = sorted(set(tables) - set(flat))
    if unknown:
        raise ConfigError(
            f"compacted names {unknown}, which are not leaves of params; pass the tables that "
            "compacted_tables(params, ...) returns."
        )
    for path, rows in tables.items():
        a = flat[path]
        flat[path] = jax.ShapeDtypeStruct((int(rows), *a.shape[1:]), a.dtype)

    def with_rows(x):
        n = _rows(x)
        ids = {
            ROWS_PREFIX + p: jax.ShapeDtypeStruct((n, int(r)), jnp.int32) for p, r in tables.items()
        }
        return {**x, **ids}

    def g_c(base, p, x):
        return compact_fn(functools.partial(g, base), tuple(tables))(p, x)

    x2 = None if x2 is None else with_rows(x2)
    return g_c, params_lib.unflatten(flat), with_rows(x1), x2


def _placed(tree: PyTree, mesh: Mesh, fsdp_axis: str | None) -> PyTree:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=_mesh.param_sharding(a, mesh, fsdp_axis)
        ),
        tree,
    )


def _program(name: str, runs: int, body: Callable, *args) -> KernelProgram:
    """``body(f, *args)`` compiled with the closed-over weights as the first argument."""

    @functools.cache
    def compile_():
        return jax.jit(body).lower(*args).compile()

    return KernelProgram(name, compile_, runs)


def kernel_programs(
    g: Callable[[PyTree, PyTree, PyTree], jax.Array],
    base: PyTree,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None,
    *,
    mesh: Mesh,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: NtkImplementation | int = NtkImplementation.JACOBIAN_CONTRACTION,
    batch_size: int | tuple[int, int] = 32,
    kernel: Kernel | str = Kernel.SGD,
    data_axis: str = "data",
    fsdp_axis: str | None = None,
    compacted: Mapping[str, int] | None = None,
) -> list[KernelProgram]:
    """The programs of ``empirical_ntk_fn(f, ..., mesh=mesh)(x1, x2, params)`` with
    ``f(p, x) = g(base, p, x)``, and how often each runs.

    Args:
      g: ``g(base, params, x) -> [N, K]``: the model of the differentiated ``params`` and the
        weights ``base`` it closes over.
      base, params: ``jax.ShapeDtypeStruct`` pytrees (unplaced): both are placed as the kernel
        places ``params`` (replicated, or split over ``fsdp_axis``).
      x1, x2: batch dicts of ``jax.ShapeDtypeStruct`` ``[N1, ...]`` / ``[N2, ...]`` (x2 None:
        x1 with itself).
      mesh: the devices (compile-only ones too; any number of processes).
      trace_axes, diagonal_axes, vmap_axes, implementation, batch_size, kernel, data_axis,
        fsdp_axis: as :func:`ntk.empirical_ntk_fn` (``implementation`` not AUTO, which
        chooses by running).
      compacted: ``{dotted path: rows}`` of the embedding tables in ``params`` that the kernel
        compacts (:func:`compacted_tables`; a model whose ``ModelInfo`` names
        ``embedding_rows``, such as ``ntk.kernel_model(output_fn, params, 'all')``): the
        programs take those tables cut to their rows and the rows' ids in each batch, as the
        kernel runs them. None: dense tables.

    Returns:
      :class:`KernelProgram` s in the order a kernel runs them.

    Raises:
      ConfigError: bad options (as :func:`ntk.empirical_ntk_fn`), AUTO, or a mesh without the
        axes named.
    """
    opts = kernel_options(
        trace_axes, diagonal_axes, vmap_axes, implementation, batch_size, None, kernel
    )
    if opts.implementation == NtkImplementation.AUTO:
        raise ConfigError(
            "kernel_programs: implementation=AUTO chooses by compiling on the device it runs "
            "on; pass the implementation to plan (e.g. the one auto_implementation returns)."
        )
    if data_axis not in mesh.axis_names or (
        fsdp_axis is not None and (fsdp_axis not in mesh.axis_names or fsdp_axis == data_axis)
    ):
        raise ConfigError(
            f"mesh has axes {mesh.axis_names}: pass data_axis (rows) and fsdp_axis (None, or "
            "another of its axes) among them."
        )
    if compacted:
        g, params, x1, x2 = _compacted(g, params, x1, x2, dict(compacted))
    lay = _jacobians.layout(mesh, data_axis, fsdp_axis)  # as the kernel lays out on this mesh
    n1 = _rows(x1)
    if x2 is None and not opts.kernel.symmetric and n1 > opts.sizes[0]:
        x2 = x1  # as ntk_fn: K(x1, x1) is not symmetric, every block is computed
    n2 = n1 if x2 is None else _rows(x2)
    m = _mesh.axis_size(mesh, data_axis)
    b1 = -(-min(opts.sizes[0], n1) // m) * m  # rows per block: a multiple of the data axis
    b2 = b1 if x2 is None else -(-min(opts.sizes[1], n2) // m) * m
    blocks1, blocks2 = -(-n1 // b1), -(-n2 // b2)
    base, params = _placed(base, mesh, fsdp_axis), _placed(params, mesh, fsdp_axis)
    trace, diag, signs = opts.trace, opts.diag, opts.kernel.signs
    block = functools.partial(_block, mesh=mesh, axis=data_axis)

    def bound(make: Callable[[Callable], Callable]) -> Callable:
        """``(base, *args) -> make(f)(*args)`` with ``f = g(base, ., .)``."""
        return lambda b, *args: make(functools.partial(g, b))(*args)

    if _reuse_jacobians(opts):  # per-example Jacobians kept across blocks (ntk._jacobians)
        if x2 is None and n1 <= b1:
            body = bound(lambda f: _jacobians.fused_fn(f, trace, diag, signs, lay))
            return [_program(f"fused ({b1} rows)", 1, body, base, params, block(x1, b1))]
        if x2 is not None and n1 <= b1 and n2 <= b2:  # one block each: their rows joined
            rows = -(-(n1 + n2) // m) * m
            body = bound(lambda f: _jacobians.pair_fn(f, trace, diag, n1, signs, lay))
            return [_program(f"pair ({n1} + {n2} rows)", 1, body, base, params, block(x1, rows))]
        side = x1 if x2 is None else x2
        jac = _program(
            f"jacobian {'x1' if x2 is None else 'x2'} ({b2} rows)",
            blocks2,
            bound(lambda f: _jacobians.jacobian_fn(f, signs[1], lay)),
            base,
            params,
            block(side, b2),
        )
        if x2 is None:  # the upper triangle of kept blocks, contracted pairwise
            pairs = blocks1 * (blocks1 + 1) // 2

            @functools.cache
            def contract():
                spec = _kept(jac)
                return (
                    jax.jit(_jacobians.contraction_fn(trace, diag, lay)).lower(spec, spec).compile()
                )

            return [jac, KernelProgram(f"contraction ({b1} x {b1} rows)", contract, pairs)]

        @functools.cache
        def cross():
            kept = [_kept(jac)] * blocks2
            body = bound(lambda f: _jacobians.cross_fn(f, trace, diag, signs[0], lay))
            return jax.jit(body).lower(base, params, block(x1, b1), kept).compile()

        name = f"cross x1 ({b1} rows) x {blocks2} kept"
        return [jac, KernelProgram(name, cross, blocks1)]
    if opts.kernel != Kernel.SGD:
        make = lambda f: _jacobians.sign_block_fn(f, trace, diag, signs, lay)  # noqa: E731
    else:
        make = lambda f: block_fn(f, opts.implementation, opts)  # noqa: E731
    what = f"block, {opts.implementation.name}"
    if x2 is not None:
        body = bound(make)
        name = f"{what} ({b1} x {b2} rows)"
        return [_program(name, blocks1 * blocks2, body, base, block(x1, b1), block(x2, b2), params)]
    # Symmetric: the diagonal blocks (x1 with itself) and those above them.
    diagonal = _program(
        f"{what} ({b1} rows with themselves)",
        blocks1,
        lambda b, a, p: make(functools.partial(g, b))(a, None, p),
        base,
        block(x1, b1),
        params,
    )
    if blocks1 == 1:
        return [diagonal]
    upper = blocks1 * (blocks1 - 1) // 2
    off = _program(
        f"{what} ({b1} x {b1} rows)", upper, bound(make), base, block(x1, b1), block(x1, b1), params
    )
    return [diagonal, off]


def _kept(jac: KernelProgram) -> Any:
    """One kept block's Jacobians: shapes, dtypes and shardings of the Jacobian program's
    output, the argument the cross / contraction programs take."""
    return jax.tree.map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding),
        jac.compile().out_info,
    )
