"""Empirical NTK of the K outputs, blocked over the batch, memory-checked and cached on disk.

``empirical_ntk_fn(f, ...)`` mirrors ``nt.empirical_ntk_fn`` (same option names, defaults and
meaning) and returns ``ntk_fn(x1, x2, params)``; the differences are for fine-tuned encoders:

* ``x1`` / ``x2`` are *batch dicts* (pytrees of arrays with leading size N), not arrays; the
  kernel is computed in ``(batch_size x batch_size)`` blocks by one jitted block kernel
  (``nt.empirical_ntk_fn`` inside), the last block padded so that it compiles once. With
  ``x2=None`` only the upper triangle of blocks is computed.
* Before computing, the block kernel is compiled and XLA's memory analysis is compared with
  the memory available (or ``memory_limit_bytes``); a block that would not fit raises
  :class:`KernelMemoryError` saying which ``batch_size`` to use.
* ``cache_dir``: kernels are saved as ``.npy`` named by a content hash of (f's fingerprint,
  params, inputs, options) and returned from disk when present.
* ``implementation=AUTO`` is our memory-aware choice (``nt``'s own AUTO is broken on current
  jax: it indexes ``cost_analysis()`` as a list).

Kernel layout (``f(params, x) -> [N, K]``), as in neural-tangents: ``trace_axes=()`` gives
``[N1, N2, K, K]``; the default ``trace_axes=(-1,)`` gives ``[N1, N2]`` holding the *mean*
over k of ``Theta[:, :, k, k]`` (nt normalizes traces by the traced size);
``diagonal_axes=(-1,)`` gives ``[N1, N2, K]``; ``diagonal_axes=(0,)`` gives the per-example
kernel ``[N, ...]`` (then ``x2`` must be None).

Example (a sketch: ``output_fn``, ``params``, ``train`` and ``test`` are the caller's):
  >>> f, adapters = ntk.lora_model_fn(output_fn, params, adapters, cfg)  # doctest: +SKIP
  >>> ntk_fn = ntk.empirical_ntk_fn(  # doctest: +SKIP
  ...     f, trace_axes=(), batch_size=32, cache_dir="runs/k"
  ... )
  >>> k_train_train = ntk_fn(train, None, adapters)  # (N, N, K, K)  # doctest: +SKIP
  >>> k_test_train = ntk_fn(test, train, adapters)  # (M, N, K, K)  # doctest: +SKIP
"""

from __future__ import annotations

import enum
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk._compat import nt
from ntk.model_fn import cast_floating, check_outputs, fingerprint

PyTree = Any
Axes = int | tuple[int, ...]

__all__ = [
    "KernelMemoryError",
    "NtkImplementation",
    "available_memory",
    "empirical_ntk_fn",
    "kernel_matrix",
]


class NtkImplementation(enum.IntEnum):
    """How the empirical NTK is computed (values equal ``nt.NtkImplementation``'s).

    Attributes:
      AUTO: (``0``) memory-aware choice made here (not nt's FLOP-based AUTO, which fails on
        current jax): compiles the block kernel with each implementation below, drops those
        that fail to compile or would not fit in memory, and takes the one with the fewest
        XLA-estimated FLOPs (ties: the more reliable one). Costs up to three compilations.
      JACOBIAN_CONTRACTION: (``1``, default) two reverse-mode Jacobians contracted over the
        parameters. Simplest and most reliable; memory grows with (block rows x K x params),
        so keep blocks small for full-parameter kernels. Best for few outputs (K = 2-6) and
        expensive forward passes (transformers).
      NTK_VECTOR_PRODUCTS: (``2``) NTK-vector products (a VJP then a JVP per output column):
        no Jacobian contraction, extra forward passes; same memory order. Good for cheap
        forward passes and many outputs; slightly more exposed to forward-mode bugs.
      STRUCTURED_DERIVATIVES: (``3``) nt's custom interpreter that exploits the structure of
        each primitive's Jacobian (e.g. a dense layer's is a Kronecker product). Often the
        fastest and leanest on dense and attention layers, but the most complex: it fails on
        some primitives (``jax.checkpoint``, ``lax.scan``, collectives; and ``jnp.split``).

    Measured (benchmarks/bench_ntk.py, MiniLM-L6, K = 2, T = 64, 8 x 8 block, shared 2-core
    CPU): with ``vmap_axes=0`` the LoRA-adapter kernels (r = 1 / 8 on query, value) took
    STRUCTURED_DERIVATIVES 2.2 / 1.8 s, JACOBIAN_CONTRACTION 3.7 / 2.6 s, NTK_VECTOR_PRODUCTS
    6.8 / 8.1 s, against 15.6 / 9.9 s for a direct ``jax.jacrev`` + einsum; without
    ``vmap_axes`` all three were 12-16 s. All agree to float32 rounding.
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


#: Preference order for AUTO ties and fallbacks: most reliable first.
_RELIABILITY = (
    NtkImplementation.JACOBIAN_CONTRACTION,
    NtkImplementation.NTK_VECTOR_PRODUCTS,
    NtkImplementation.STRUCTURED_DERIVATIVES,
)


class KernelMemoryError(MemoryError):
    """A kernel block would not fit in the memory available."""


def available_memory(device: jax.Device | None = None) -> int:
    """Bytes available for one computation on ``device`` (default: the first device).

    Accelerators: ``bytes_limit - bytes_in_use`` from ``memory_stats()``. CPU: ``MemAvailable``
    from ``/proc/meminfo`` (else total physical memory).
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _canon(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axes} has axis {a} out of range for outputs of ndim {ndim}.")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def _num_rows(x: PyTree, name: str) -> int:
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(x) if np.ndim(leaf) >= 1}
    if len(sizes) != 1:
        raise ValueError(
            f"{name} must be a batch dict whose arrays all have the same leading size N; got "
            f"leading sizes {sorted(sizes) or 'none'}."
        )
    return sizes.pop()


def _take(x: PyTree, start: int, size: int, n: int) -> PyTree:
    """Rows ``start:start+size`` of x, padded by repeating the last row (static shapes)."""
    idx = np.minimum(np.arange(start, start + size), n - 1)
    return jax.tree.map(lambda a: a[idx] if np.ndim(a) >= 1 else a, x)


def _swap(block: np.ndarray, n_pairs: int) -> np.ndarray:
    """Kernel block for (x2, x1) from the one for (x1, x2): swap N1/N2 and each K/K pair."""
    axes = [1, 0]
    rest = list(range(2, block.ndim))
    # After (N1, N2): `n_pairs` zipped pairs (K, K'), then diagonal axes (unpaired).
    for i in range(n_pairs):
        axes += [rest[2 * i + 1], rest[2 * i]]
    axes += rest[2 * n_pairs :]
    return np.transpose(block, axes)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def empirical_ntk_fn(
    f: Callable[[PyTree, PyTree], jax.Array],
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: NtkImplementation | int = NtkImplementation.JACOBIAN_CONTRACTION,
    batch_size: int | tuple[int, int] = 32,
    dtype: Any = None,
    memory_limit_bytes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Callable[..., np.ndarray]:
    """Returns ``ntk_fn(x1, x2, params)``: the empirical NTK of ``f``'s outputs, blocked.

    Args:
      f: ``f(params, x) -> [N, K]`` with ``x`` a batch dict (e.g. from
        :func:`ntk.model_fn` / :func:`ntk.lora_model_fn`).
      trace_axes: output axes to trace the kernel over (nt: the mean over the traced axis),
        saving memory; ``()`` keeps the full ``[N1, N2, K, K]`` kernel, which exact
        finite-width linearized dynamics need.
      diagonal_axes: output axes on which only the diagonal is computed (``(-1,)``:
        ``[N1, N2, K]``; ``(0,)``: per-example kernels, ``x2`` must be None).
      vmap_axes: passed to ``nt.empirical_ntk_fn``: batch axes of inputs / outputs along which
        ``f`` is independent per example (e.g. ``0``, also for batch dicts). None (default, as
        nt) assumes nothing, so nt differentiates the whole block as one function: the
        Jacobian of a b-row block costs b*K reverse passes over all b rows, i.e. time and
        memory quadratic in b. For a per-example model (the encoders without dropout) pass
        ``vmap_axes=0``: cost linear in b. On MiniLM with LoRA r = 8, a 250 x 64 block was
        estimated at 353 GiB without it; see benchmarks/bench_ntk.py.
      implementation: see :class:`NtkImplementation`.
      batch_size: rows of ``x1`` and of ``x2`` per block, or a pair ``(rows of x1, rows of x2)``.
        Each block recomputes the Jacobians of its rows, so for a test x train kernel with a
        small train set, take all of ``x2`` in one block and many ``x1`` rows per block (e.g.
        ``(250, 64)`` for 1,000 x 64): total work ~ N1 + N2 * (N1 / rows of x1) Jacobian rows.
      dtype: if given (e.g. ``jnp.float64``), floating leaves of params and inputs are cast
        (for float64 the weights ``f`` closes over should be cast too: build ``f`` with
        ``dtype=``).
      memory_limit_bytes: memory a block may use; None: what :func:`available_memory` reports.
      cache_dir: directory of an on-disk kernel cache (``.npy`` per kernel); None: no cache.
      progress: show a tqdm bar over blocks.

    Returns:
      ``ntk_fn(x1, x2, params) -> np.ndarray``: x1 ``[N1, ...]`` and x2 ``[N2, ...]`` batch
      dicts (``x2=None`` means x1), ``params`` the pytree ``f`` differentiates. Shape:
      ``[N1, N2]`` + ``zip`` of the output axes that are neither traced nor diagonal
      (``[N1, N2, K, K]``) + diagonal axes, as in neural-tangents.

    Raises:
      KernelMemoryError: before computing, if one block's compiled program would need more
        than the memory available; the message gives the ``batch_size`` to use.
      ValueError: on bad axes, inputs whose arrays disagree on N, or ``f`` not returning
        ``[N, K]``.
    """
    try:
        implementation = NtkImplementation(implementation)
    except ValueError:
        allowed = ", ".join(m.name for m in NtkImplementation)
        raise ValueError(f"implementation={implementation!r} is not one of {allowed}.") from None
    sizes = (batch_size, batch_size) if isinstance(batch_size, int) else tuple(batch_size)
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"batch_size must be an int >= 1 or a pair of them, got {batch_size}.")
    trace = _canon(trace_axes, 2, "trace_axes")
    diag = _canon(diagonal_axes, 2, "diagonal_axes")
    if set(trace) & set(diag):
        raise ValueError(f"trace_axes={trace_axes} and diagonal_axes={diagonal_axes} overlap.")
    if 0 in trace:
        raise ValueError(
            f"trace_axes={trace_axes} traces the batch axis; only output axes (-1) can be "
            "traced here. Sum the kernel yourself if you need that."
        )
    batch_diagonal = 0 in diag
    n_pairs = int(1 not in trace and 1 not in diag)
    nt_kwargs = dict(trace_axes=trace, diagonal_axes=diag, vmap_axes=vmap_axes)
    compiled: dict[tuple, Any] = {}
    chosen: dict[str, NtkImplementation] = {}
    limit_fn = (lambda: memory_limit_bytes) if memory_limit_bytes else available_memory

    def compile_block(impl, xa, xb, params):
        def spec(a):
            return np.shape(a), str(getattr(a, "dtype", None) or np.result_type(a))

        shapes = jax.tree.map(spec, (xa, xb, params))
        key = (int(impl), str(jax.tree.structure((xa, xb, params))), str(shapes))
        if key not in compiled:
            check_outputs(jax.eval_shape(f, params, xa), xa, where="f")
            fn = nt.empirical_ntk_fn(f, implementation=int(impl), **nt_kwargs)
            if xb is None:
                lowered = jax.jit(lambda a, p: fn(a, None, p)).lower(xa, params)
            else:
                lowered = jax.jit(fn).lower(xa, xb, params)
            compiled[key] = lowered.compile()
        return compiled[key]

    def required_bytes(exe) -> int:
        m = exe.memory_analysis()
        if m is None:
            return 0
        peak = getattr(m, "peak_memory_in_bytes", 0) or 0
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return int(max(peak, total - m.alias_size_in_bytes))

    def check_memory(exe, impl, b1, b2):
        need, limit = required_bytes(exe), int(limit_fn())
        if need > limit:
            scale = limit / need * 0.8
            suggest = max(1, int(b1 * scale))
            if b1 != b2:
                suggest = (suggest, max(1, int(b2 * scale)))
            raise KernelMemoryError(
                f"One ({b1} x {b2})-example kernel block with {impl.name} needs an estimated "
                f"{_gib(need)} (XLA memory analysis), more than the {_gib(limit)} available. "
                f"Use batch_size={suggest} (memory grows about linearly with it), a smaller "
                "parameter subset, trace_axes=(-1,), or implementation=STRUCTURED_DERIVATIVES."
            )

    def choose(xa, xb, params, b1, b2):
        """Compiles the block kernel, checks memory, resolves AUTO."""
        if implementation != NtkImplementation.AUTO:
            exe = compile_block(implementation, xa, xb, params)
            check_memory(exe, implementation, b1, b2)
            return exe
        if "impl" in chosen:
            return compile_block(chosen["impl"], xa, xb, params)
        candidates, errors = [], []
        limit = int(limit_fn())
        for impl in _RELIABILITY:
            try:
                exe = compile_block(impl, xa, xb, params)
            except Exception as err:  # noqa: BLE001 - an implementation may not support f
                errors.append(f"{impl.name}: {type(err).__name__}: {err}"[:300])
                continue
            need = required_bytes(exe)
            if need > limit:
                errors.append(f"{impl.name}: needs {_gib(need)} > {_gib(limit)}")
                continue
            cost = exe.cost_analysis() or {}
            if isinstance(cost, list | tuple):
                cost = cost[0] if cost else {}
            candidates.append((float(cost.get("flops", np.inf)), _RELIABILITY.index(impl), impl))
        if not candidates:
            raise KernelMemoryError(
                "implementation=AUTO: no implementation fits a "
                f"({b1} x {b2}) block: " + "; ".join(errors) + ". Lower batch_size."
            )
        chosen["impl"] = min(candidates)[2]
        return compile_block(chosen["impl"], xa, xb, params)

    def cache_path(x1, x2, params) -> Path | None:
        if cache_dir is None:
            return None
        options = (trace, diag, repr(vmap_axes), implementation.name, str(dtype))
        fid = getattr(f, "__ntk_fingerprint__", None) or (
            f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"
        )
        key = fingerprint({"params": params, "x1": x1, "x2": x2 or {}}, fid, options, x2 is None)
        return Path(cache_dir) / f"ntk-{key[:40]}.npy"

    def ntk_fn(x1: PyTree, x2: PyTree | None, params: PyTree) -> np.ndarray:
        path = cache_path(x1, x2, params)
        if path is not None and path.exists():
            return np.load(path)
        params = cast_floating(params, dtype)
        x1c = cast_floating(x1, dtype)
        x2c = None if x2 is None else cast_floating(x2, dtype)
        n1 = _num_rows(x1c, "x1")
        n2 = n1 if x2c is None else _num_rows(x2c, "x2")
        if batch_diagonal and x2c is not None:
            raise ValueError("diagonal_axes includes the batch axis 0: pass x2=None.")
        symmetric = x2c is None
        b1 = min(sizes[0], n1)
        b2 = b1 if symmetric else min(sizes[1], n2)
        if batch_diagonal:
            jobs = [(i, i) for i in range(0, n1, b1)]
        elif symmetric:
            jobs = [(i, j) for i in range(0, n1, b1) for j in range(i, n1, b1)]
        else:
            jobs = [(i, j) for i in range(0, n1, b1) for j in range(0, n2, b2)]

        out = None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="eNTK blocks", unit="block")
        for i, j in jobs:
            xa = _take(x1c, i, b1, n1)
            if symmetric and i == j:
                exe = choose(xa, None, params, b1, b1)
                block = np.asarray(exe(xa, params))
            else:
                xb = _take(x1c if symmetric else x2c, j, b2, n2)
                exe = choose(xa, xb, params, b1, b2)
                block = np.asarray(exe(xa, xb, params))
            if block.ndim < 1 or block.shape[0] != b1:
                raise ValueError(f"Unexpected kernel block shape {block.shape}.")
            if out is None:
                tail = block.shape[1:] if batch_diagonal else block.shape[2:]
                shape = (n1,) + tail if batch_diagonal else (n1, n2) + tail
                out = np.empty(shape, block.dtype)
            r1 = min(b1, n1 - i)
            if batch_diagonal:
                out[i : i + r1] = block[:r1]
            else:
                r2 = min(b2, n2 - j)
                out[i : i + r1, j : j + r2] = block[:r1, :r2]
                if symmetric and i != j:
                    out[j : j + r2, i : i + r1] = _swap(block[:r1, :r2], n_pairs)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as fh:
                np.save(fh, out)
            os.replace(fh.name, path)
        return out

    ntk_fn.chosen_implementation = lambda: chosen.get("impl", implementation)
    return ntk_fn


def kernel_matrix(k: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Flattens a ``[N1, N2, K, K]`` kernel into the ``[N1*K, N2*K]`` matrix (row = (n, k)).

    A ``[N1, N2]`` (traced) kernel is returned as is.
    """
    if k.ndim == 2:
        return k
    if k.ndim != 4:
        raise ValueError(f"Expected a [N1, N2] or [N1, N2, K, K] kernel; got shape {k.shape}.")
    n1, n2, k1, k2 = k.shape
    xp = jnp if isinstance(k, jax.Array) else np
    return xp.transpose(k, (0, 2, 1, 3)).reshape(n1 * k1, n2 * k2)  # (N1 K, N2 K)
