"""Empirical NTK of the K outputs, blocked over the batch, memory-checked and cached on disk.

``empirical_ntk_fn(f, ...)`` mirrors ``nt.empirical_ntk_fn`` (same option names, defaults and
meaning) and returns ``ntk_fn(x1, x2, params)``; the differences are for fine-tuned encoders:

* ``x1`` / ``x2`` are *batch dicts* (pytrees of arrays with leading size N), not arrays; the
  kernel is computed in ``(batch_size x batch_size)`` blocks by one jitted block kernel
  (``nt.empirical_ntk_fn`` inside), the last block padded so that it compiles once. With
  ``x2=None`` only the upper triangle of blocks is computed.
* Before computing, the block kernel is compiled and XLA's memory analysis is compared with
  the memory available (or ``memory_limit_bytes``); a block that would not fit raises
  :class:`KernelMemoryError` naming an implementation or ``batch_size`` checked to fit.
* ``cache_dir``: kernels are saved as ``.npy`` named by a content hash of (f's code and every
  value it closes over, e.g. the label words, or ``model_info.fingerprint``; params, inputs,
  options) and returned from disk when present (:mod:`ntk._kernel_cache`).
* Compiled block programs are kept for the session (keyed by f's fingerprint, options and
  shapes), so a second ``ntk_fn`` of the same model and shapes compiles nothing. Across
  processes, JAX's own persistent cache applies to them: set ``JAX_COMPILATION_CACHE_DIR``
  (or ``jax.config.update("jax_compilation_cache_dir", path)``) and a later process loads the
  programs instead of compiling them.
* ``model_info`` (:class:`ntk.ModelInfo`, from :func:`ntk.kernel_model`) says what else the
  kernel may exploit about ``f``; it is passed explicitly, never read from attributes of ``f``.
* Embedding tables among the differentiated weights are cut to the rows each block reads
  (:mod:`ntk.compact`, when ``model_info.embedding_rows`` is given): exact, and the
  all-weights kernel of an encoder no longer carries the dense ``[V, H]`` Jacobian of its
  word embeddings.
* With JACOBIAN_CONTRACTION and ``vmap_axes=0``, per-example Jacobians are computed once per
  row and kept across blocks (:mod:`ntk._jacobians`); a symmetric kernel with ``batch_size``
  >= N is one fused program that never holds the whole ``[N K, P]`` Jacobian (the fastest
  and leanest way to an all-weights train kernel: ``batch_size=N``), and an ``x1`` x ``x2``
  kernel whose sides fit one block each is one program on their joined rows. For this library's
  encoders (``model_info.ignores_padding``), rows are sorted by length and each block is cut to
  its longest row (:mod:`ntk._padding`): exact, since padded positions have zero weight and
  derivative.
* ``kernel`` (:class:`ntk.Kernel`) picks the optimizer's kernel: the SGD eNTK, SignGD's
  ``<sign g, sign g'>`` or Adam's asymmetric A-SignGD ``<g, sign g'>`` (per-example gradients,
  the kept-Jacobian programs above with signs applied; blocks, memory checks, compaction,
  padding cuts and the cache as for the eNTK).
* ``mesh``: the rows of every block split over the mesh's ``data`` axis (:mod:`ntk._mesh`).
* ``implementation=AUTO`` is our memory-aware choice (``nt``'s own AUTO is broken on current
  jax: it indexes ``cost_analysis()`` as a list); :func:`auto_implementation` tells which
  implementation it takes.

Kernel layout (``f(params, x) -> [N, K]``), as in neural-tangents: ``trace_axes=()`` gives
``[N1, N2, K, K]``; the default ``trace_axes=(-1,)`` gives ``[N1, N2]`` holding the *mean*
over k of ``Theta[:, :, k, k]`` (nt normalizes traces by the traced size);
``diagonal_axes=(-1,)`` gives ``[N1, N2, K]``; ``diagonal_axes=(0,)`` gives the per-example
kernel ``[N, ...]`` (then ``x2`` must be None).

Example (a sketch: ``output_fn``, ``params``, ``train`` and ``test`` are the caller's):
  >>> f, adapters, info = ntk.lora_kernel_model(output_fn, params, adapters, cfg)  # doctest: +SKIP
  >>> ntk_fn = ntk.empirical_ntk_fn(  # doctest: +SKIP
  ...     f, trace_axes=(), batch_size=32, cache_dir="runs/k", model_info=info
  ... )
  >>> k_train_train = ntk_fn(train, None, adapters)  # (N, N, K, K)  # doctest: +SKIP
  >>> k_test_train = ntk_fn(test, train, adapters)  # (M, N, K, K)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import distributed
from lora_jax.errors import ConfigError, UserError
from lora_jax.rows import num_rows, take_rows
from ntk import _kernel_cache, _mesh, _padding
from ntk._compat import nt
from ntk._jacobians import (
    DEFAULT_LAYOUT,
    Layout,
    cross_program,
    fused_program,
    jacobian_bytes,
    jacobian_program,
    kept_spec,
    layout,
    pair_program,
    reused_kernel,
    sign_block_program,
)
from ntk._memory import available_memory, gib, required_bytes
from ntk._programs import compiled, program_fn_key
from ntk.compact import ROWS_PREFIX, compact_block, compact_fn, compactable_tables
from ntk.models import ModelInfo, cast_floating, check_outputs
from ntk.optimizer import Kernel, as_kernel

PyTree = Any
Axes = int | tuple[int, ...]

__all__ = [
    "KernelMemoryError",
    "KernelOptions",
    "NtkImplementation",
    "auto_implementation",
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
        some primitives (``jax.checkpoint``, ``lax.scan``, collectives; and ``jnp.split``),
        and it has no rule for ``gather``, so an embedding table among the differentiated
        weights gets the dense Jacobian of its lookup, ``(T*H) x (V*H)`` floats per example
        (MiniLM, T = 64: 1,073 GiB): use JACOBIAN_CONTRACTION for all-weights kernels.

    On LoRA-adapter kernels of an encoder all three agree to float32 rounding, and with
    ``vmap_axes=0`` each is faster than a direct ``jax.jacrev`` + einsum (STRUCTURED_DERIVATIVES
    the most); without ``vmap_axes`` they lose most of that. Timings: ``benchmarks/README.md``
    ("eNTK implementations on LoRA adapters"), from ``benchmarks/bench_ntk.py``.
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


class KernelMemoryError(UserError, MemoryError):
    """A kernel block would not fit in the memory available; the message names an
    implementation or ``batch_size`` checked to fit (one ``error:`` line from the CLI)."""


def _canon(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ConfigError(
                f"{name}={axes} has axis {a}, out of range for outputs [N, K] (ndim {ndim}): "
                "use -1 (or 1) for the K outputs, 0 for the batch."
            )
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def _swap(block: np.ndarray, n_pairs: int) -> np.ndarray:
    """Kernel block for (x2, x1) from the one for (x1, x2): swap N1/N2 and each K/K pair."""
    axes = [1, 0]
    rest = list(range(2, block.ndim))
    # After (N1, N2): `n_pairs` zipped pairs (K, K'), then diagonal axes (unpaired).
    for i in range(n_pairs):
        axes += [rest[2 * i + 1], rest[2 * i]]
    axes += rest[2 * n_pairs :]
    return np.transpose(block, axes)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """The checked options of one :func:`empirical_ntk_fn` (see there)."""

    trace: tuple[int, ...]
    diag: tuple[int, ...]
    vmap_axes: Any
    implementation: NtkImplementation
    sizes: tuple[int, int]  # rows of x1, rows of x2 per block
    dtype: Any
    kernel: Kernel = Kernel.SGD
    layout: Layout = DEFAULT_LAYOUT  # the Jacobians' placement and Gram slices (_jacobians.layout)

    @property
    def batch_diagonal(self) -> bool:
        return 0 in self.diag

    @property
    def n_pairs(self) -> int:
        """How many (K, K') axis pairs a block has after (N1, N2): 1 or 0."""
        return int(1 not in self.trace and 1 not in self.diag)

    def key(self) -> tuple:
        key = (
            self.trace,
            self.diag,
            repr(self.vmap_axes),
            self.implementation.name,
            str(self.dtype),
        )
        return key if self.kernel == Kernel.SGD else (*key, self.kernel.value)

    def nt_kwargs(self) -> dict:
        return dict(trace_axes=self.trace, diagonal_axes=self.diag, vmap_axes=self.vmap_axes)


def kernel_options(
    trace_axes: Axes,
    diagonal_axes: Axes,
    vmap_axes: Any,
    implementation: NtkImplementation | int,
    batch_size: int | tuple[int, int],
    dtype: Any,
    kernel: Kernel | str = Kernel.SGD,
) -> KernelOptions:
    """Checks :func:`empirical_ntk_fn` 's options.

    Raises:
      ConfigError: naming the bad option and what is allowed.
    """
    kernel = as_kernel(kernel)
    try:
        implementation = NtkImplementation(implementation)
    except ValueError:
        allowed = ", ".join(f"NtkImplementation.{m.name}" for m in NtkImplementation)
        raise ConfigError(
            f"implementation={implementation!r} is not one of {allowed}: pass one of them."
        ) from None
    sizes = (batch_size, batch_size) if isinstance(batch_size, int) else tuple(batch_size)
    if len(sizes) != 2 or min(sizes) < 1:
        raise ConfigError(
            f"batch_size must be an int >= 1 or a pair of them (rows of x1, rows of x2), "
            f"got {batch_size}."
        )
    trace = _canon(trace_axes, 2, "trace_axes")
    diag = _canon(diagonal_axes, 2, "diagonal_axes")
    if set(trace) & set(diag):
        raise ConfigError(
            f"trace_axes={trace_axes} and diagonal_axes={diagonal_axes} overlap: an output axis "
            "is either traced or kept diagonal; drop it from one of them."
        )
    if 0 in trace:
        raise ConfigError(
            f"trace_axes={trace_axes} traces the batch axis; only output axes (-1) can be "
            "traced here. Sum the kernel yourself if you need that."
        )
    if kernel != Kernel.SGD and not (
        implementation in (NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.AUTO)
        and isinstance(vmap_axes, int)
        and vmap_axes == 0
        and 0 not in diag
    ):
        raise ConfigError(
            f"kernel={kernel.name} needs per-example gradients (sign is not linear): pass "
            "implementation=NtkImplementation.JACOBIAN_CONTRACTION and vmap_axes=0 (a model "
            "independent per example), without diagonal_axes on the batch (0); got "
            f"implementation={implementation.name}, vmap_axes={vmap_axes!r}, "
            f"diagonal_axes={diagonal_axes}."
        )
    if kernel != Kernel.SGD:  # one way to compute it: AUTO has nothing to choose
        implementation = NtkImplementation.JACOBIAN_CONTRACTION
    return KernelOptions(trace, diag, vmap_axes, implementation, sizes, dtype, kernel)


def block_jobs(
    n1: int, n2: int, b1: int, b2: int, *, symmetric: bool, batch_diagonal: bool
) -> list[tuple[int, int]]:
    """Start rows ``(i, j)`` of the blocks to compute (upper triangle when symmetric)."""
    if batch_diagonal:
        return [(i, i) for i in range(0, n1, b1)]
    if symmetric:
        return [(i, j) for i in range(0, n1, b1) for j in range(i, n1, b1)]
    return [(i, j) for i in range(0, n1, b1) for j in range(0, n2, b2)]


def block_fn(f: Callable, impl: NtkImplementation, opts: KernelOptions) -> Callable:
    """``(xa, xb, params) -> block`` of the SGD eNTK (``xb=None``: ``xa`` with itself):
    neural-tangents' kernel with ``impl`` and ``opts`` (the sign kernels' is
    ``ntk._jacobians.sign_block_fn``)."""
    return nt.empirical_ntk_fn(f, implementation=int(impl), **opts.nt_kwargs())


def block_program(
    f: Callable, fn_key: tuple, impl: NtkImplementation, opts: KernelOptions, xa, xb, params
) -> Any:
    """The compiled kernel of one ``(xa, xb)`` block (``xb=None``: ``xa`` with itself), cached
    for the session by (f, implementation, options, shapes and dtypes)."""

    if opts.kernel != Kernel.SGD:  # per-example gradients and their signs (ntk._jacobians)
        signs = opts.kernel.signs
        return sign_block_program(
            f, fn_key, opts.trace, opts.diag, xa, xb, params, signs, opts.layout
        )

    def lower():
        check_outputs(jax.eval_shape(f, params, xa), xa, where="f")
        fn = block_fn(f, impl, opts)
        if xb is None:
            return jax.jit(lambda a, p: fn(a, None, p)).lower(xa, params)
        return jax.jit(fn).lower(xa, xb, params)

    return compiled(f, fn_key, ("block", int(impl), opts.key()), lower, (xa, xb, params))


def _fits(compile_fn: Callable[[], Any], limit: int) -> int | None:
    """The bytes a program needs if it compiles and fits in ``limit``, else None."""
    try:
        need = required_bytes(compile_fn())
    except Exception:  # noqa: BLE001 - an alternative that does not compile is no alternative
        return None
    return need if need <= limit else None


def refusal(
    f, fn_key, impl: NtkImplementation, opts: KernelOptions, xa, xb, params, need: int, limit: int
) -> str:
    """The message for a block that does not fit, naming alternatives checked to fit.

    Tries the other implementations at the same block, then the same implementation at a block
    scaled down to fit (memory grows about linearly with the rows): each compiled and measured
    like the refused one, so what is suggested differs from what was asked and fits.
    """
    b1 = num_rows(xa)
    b2 = b1 if xb is None else num_rows(xb)
    where = (
        f"One ({b1} x {b2})-example kernel block with {impl.name} needs an estimated "
        f"{gib(need)} (XLA memory analysis), more than the {gib(limit)} available."
    )
    for other in _RELIABILITY if opts.kernel == Kernel.SGD else ():
        if other != impl:
            fit = _fits(lambda o=other: block_program(f, fn_key, o, opts, xa, xb, params), limit)
            if fit is not None:
                return f"{where} Use implementation={other.name} (estimated {gib(fit)} there)."
    scale = limit / need * 0.8
    s1, s2 = max(1, int(b1 * scale)), max(1, int(b2 * scale))
    suggest = s1 if xb is None or (opts.sizes[0] == opts.sizes[1] and s1 == s2) else (s1, s2)
    small_a = take_rows(xa, 0, s1)
    small_b = None if xb is None else take_rows(xb, 0, s2)
    fit = None
    if (s1, s2) != (b1, b2):
        fit = _fits(lambda: block_program(f, fn_key, impl, opts, small_a, small_b, params), limit)
    if fit is not None:
        return f"{where} Use batch_size={suggest} (estimated {gib(fit)} there)."
    return (
        f"{where} No other implementation fits, nor batch_size={suggest}; use a smaller "
        "parameter subset, trace_axes=(-1,), or more memory (memory_limit_bytes)."
    )


def select_program(f, fn_key, opts: KernelOptions, xa, xb, params, limit: int, chosen: dict) -> Any:
    """The block program to run: compiled, checked against ``limit``, AUTO resolved."""
    impl = opts.implementation
    if impl != NtkImplementation.AUTO:
        exe = block_program(f, fn_key, impl, opts, xa, xb, params)
        need = required_bytes(exe)
        if need > limit:
            raise KernelMemoryError(refusal(f, fn_key, impl, opts, xa, xb, params, need, limit))
        return exe
    if "impl" in chosen:
        return block_program(f, fn_key, chosen["impl"], opts, xa, xb, params)
    candidates, errors = [], []
    for impl in _RELIABILITY:
        try:
            exe = block_program(f, fn_key, impl, opts, xa, xb, params)
        except Exception as err:  # noqa: BLE001 - an implementation may not support f
            errors.append(f"{impl.name}: {type(err).__name__}: {err}"[:300])
            continue
        need = required_bytes(exe)
        if need > limit:
            errors.append(f"{impl.name}: needs {gib(need)} > {gib(limit)}")
            continue
        cost = exe.cost_analysis() or {}
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        candidates.append((float(cost.get("flops", np.inf)), _RELIABILITY.index(impl), impl))
    if not candidates:
        b1 = num_rows(xa)
        b2 = b1 if xb is None else num_rows(xb)
        raise KernelMemoryError(
            f"implementation=AUTO: no implementation fits a ({b1} x {b2}) block: "
            + "; ".join(errors)
            + ". Lower batch_size."
        )
    chosen["impl"] = min(candidates)[2]
    return block_program(f, fn_key, chosen["impl"], opts, xa, xb, params)


def place_block(
    out: np.ndarray | None,
    block: np.ndarray,
    i: int,
    j: int,
    n1: int,
    n2: int,
    *,
    symmetric: bool,
    opts: KernelOptions,
) -> np.ndarray:
    """Writes a (padded) block computed at rows ``(i, j)`` into ``out`` (made on first use)."""
    b1 = block.shape[0]
    if block.ndim < 1:
        raise ValueError(f"Unexpected kernel block shape {block.shape}.")
    if out is None:
        tail = block.shape[1:] if opts.batch_diagonal else block.shape[2:]
        shape = (n1,) + tail if opts.batch_diagonal else (n1, n2) + tail
        out = np.empty(shape, block.dtype)
    r1 = min(b1, n1 - i)
    if opts.batch_diagonal:
        out[i : i + r1] = block[:r1]
        return out
    r2 = min(block.shape[1], n2 - j)
    out[i : i + r1, j : j + r2] = block[:r1, :r2]
    if symmetric and i != j:
        out[j : j + r2, i : i + r1] = _swap(block[:r1, :r2], opts.n_pairs)
    return out


class _Blocks(NamedTuple):
    """One kernel's inputs, checked and cast, and how it is cut into blocks."""

    params: PyTree
    x1: PyTree
    x2: PyTree | None  # None: x1 with itself (symmetric)
    n1: int
    n2: int
    b1: int  # rows of x1 per block
    b2: int
    tables: tuple[str, ...]  # embedding tables compacted (ntk.compact)
    fn: Callable  # f, on compacted tables if any
    fn_key: tuple  # the compiled-program key of fn
    embedding_rows: np.ndarray | None  # ModelInfo.embedding_rows

    def block(self, i: int, j: int) -> tuple[PyTree, PyTree | None, PyTree]:
        """``(xa, xb, params)`` of the block at rows ``(i, j)`` (``xb`` None on the diagonal of
        a symmetric kernel), tables compacted to the rows it reads."""
        symmetric = self.x2 is None
        xa = take_rows(self.x1, i, self.b1, self.n1)
        other = self.x1 if symmetric else self.x2
        xb = None if symmetric and i == j else take_rows(other, j, self.b2, self.n2)
        if not self.tables:
            return xa, xb, self.params
        p, blocks = compact_block(
            self.embedding_rows, self.params, [x for x in (xa, xb) if x is not None], self.tables
        )
        return blocks[0], (None if xb is None else blocks[1]), p


def _blocks(
    f: Callable,
    info: ModelInfo,
    opts: KernelOptions,
    x1: PyTree,
    x2: PyTree | None,
    params,
    multiple: int = 1,
) -> _Blocks:
    params = cast_floating(params, opts.dtype)
    x1 = cast_floating(x1, opts.dtype)
    x2 = None if x2 is None else cast_floating(x2, opts.dtype)
    n1 = num_rows(x1, "x1")
    n2 = n1 if x2 is None else num_rows(x2, "x2")
    if opts.batch_diagonal and x2 is not None:
        raise ConfigError(
            "diagonal_axes includes the batch axis 0 (per-example kernels): pass x2=None."
        )
    b1 = -(-min(opts.sizes[0], n1) // multiple) * multiple  # rows per block: a multiple of
    b2 = b1 if x2 is None else -(-min(opts.sizes[1], n2) // multiple) * multiple  # the mesh's
    tables = compactable_tables(info.embedding_rows, params)
    fn = compact_fn(f, tables) if tables else f
    fn_key = (*program_fn_key(f, info), tables)
    return _Blocks(params, x1, x2, n1, n2, b1, b2, tables, fn, fn_key, info.embedding_rows)


def auto_implementation(
    f: Callable[[PyTree, PyTree], jax.Array],
    x1: PyTree,
    x2: PyTree | None,
    params: PyTree,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    batch_size: int | tuple[int, int] = 32,
    dtype: Any = None,
    memory_limit_bytes: int | None = None,
    model_info: ModelInfo | None = None,
    kernel: Kernel | str = Kernel.SGD,
) -> NtkImplementation:
    """The implementation ``empirical_ntk_fn(..., implementation=AUTO)`` takes for these inputs.

    AUTO compiles the first ``(x1, x2)`` block with each implementation, drops those that fail
    to compile or would not fit in memory, and takes the one with the fewest XLA-estimated FLOPs
    (see :class:`NtkImplementation`); an ``ntk_fn`` makes this choice on its first block and
    keeps it. This returns the choice, so that it can be recorded or passed on explicitly.
    Compiled programs are kept for the session: a kernel computed next with the returned
    implementation (or with AUTO) compiles nothing new.

    Args: as :func:`empirical_ntk_fn` and its ``ntk_fn(x1, x2, params)``.

    Returns:
      One of JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES.

    Raises:
      KernelMemoryError: if no implementation fits a block.
    """
    auto = NtkImplementation.AUTO
    opts = kernel_options(trace_axes, diagonal_axes, vmap_axes, auto, batch_size, dtype, kernel)
    if opts.kernel != Kernel.SGD:
        return opts.implementation
    blocks = _blocks(f, model_info or ModelInfo(), opts, x1, x2, params)
    xa, xb, p = blocks.block(0, 0)
    limit = int(memory_limit_bytes or available_memory())
    chosen: dict[str, NtkImplementation] = {}
    select_program(blocks.fn, blocks.fn_key, opts, xa, xb, p, limit, chosen)
    return chosen["impl"]


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
    model_info: ModelInfo | None = None,
    kernel: Kernel | str = Kernel.SGD,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    fsdp_axis: str | None = None,
) -> Callable[..., np.ndarray]:
    """Returns ``ntk_fn(x1, x2, params)``: the empirical NTK of ``f``'s outputs, blocked.

    Args:
      f: ``f(params, x) -> [N, K]`` with ``x`` a batch dict (e.g. from
        :func:`ntk.kernel_model` / :func:`ntk.lora_kernel_model`).
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
      implementation: see :class:`NtkImplementation`; with AUTO, :func:`auto_implementation`
        tells which one is taken.
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
      model_info: what the kernel may exploit about ``f`` (:class:`ntk.ModelInfo`: its cache
        fingerprint, the embedding rows it reads, whether it ignores padding), e.g. the
        ``info`` of :func:`ntk.kernel_model`; None: ``ModelInfo()``, nothing assumed.
      kernel: which optimizer's kernel (:class:`ntk.Kernel`, or its value): ``SGD`` (default)
        the eNTK ``<grad f(x1), grad f(x2)>``; ``SIGNGD`` ``<sign grad f(x1), sign grad
        f(x2)>``; ``ASIGNGD`` ``<grad f(x1), sign grad f(x2)>`` (Adam's, not symmetric: with
        ``x2=None`` every block of ``K(x1, x1)`` is computed). The sign kernels need
        ``implementation=JACOBIAN_CONTRACTION`` (or AUTO) and ``vmap_axes=0``.
      mesh: a ``jax.sharding.Mesh``: the rows of every block are split over its
        ``data_axis`` and the parameters replicated (:mod:`ntk._mesh`), so the devices share
        each block's per-example gradients; rows per block are rounded up to a multiple of the
        axis size, and the memory check is per device. The mesh may span several processes:
        each then calls ``ntk_fn`` with the same inputs and gets the whole kernel. None: one
        device.
      data_axis: the mesh axis the rows are split over.
      fsdp_axis: a second mesh axis to split the parameters over (each leaf along a dimension
        the axis size divides) instead of replicating them: the Jacobian columns are split too
        and the Gram sums reduced across the axis, for models whose per-example gradients do
        not fit one device. None: parameters replicated.

    Returns:
      ``ntk_fn(x1, x2, params) -> np.ndarray``: x1 ``[N1, ...]`` and x2 ``[N2, ...]`` batch
      dicts (``x2=None`` means x1), ``params`` the pytree ``f`` differentiates. Shape:
      ``[N1, N2]`` + ``zip`` of the output axes that are neither traced nor diagonal
      (``[N1, N2, K, K]``) + diagonal axes, as in neural-tangents.

    Raises:
      KernelMemoryError: before computing, if one block's compiled program would need more
        than the memory available; the message names an implementation or ``batch_size``
        checked (compiled and measured) to fit.
      ConfigError: on bad options or axes, inputs whose arrays disagree on N, ``f`` not
        returning ``[N, K]``, or ``model_info.embedding_rows`` missing rows ``f`` reads.
    """
    opts = kernel_options(
        trace_axes, diagonal_axes, vmap_axes, implementation, batch_size, dtype, kernel
    )
    info = model_info or ModelInfo()
    _mesh.check_mesh(mesh, data_axis, fsdp_axis)
    opts = dataclasses.replace(opts, layout=layout(mesh, data_axis, fsdp_axis))
    on_mesh = (lambda x: x) if mesh is None else (lambda x: _mesh.rows_on_mesh(x, mesh, data_axis))
    chosen: dict[str, NtkImplementation] = {}  # AUTO's choice, made on the first block
    limit_fn = (lambda: memory_limit_bytes) if memory_limit_bytes else available_memory

    def ntk_fn(x1: PyTree, x2: PyTree | None, params: PyTree) -> np.ndarray:
        params = _mesh.host_params(params, mesh)  # arrays over several processes: cut on host
        path = None
        if cache_dir is not None:
            path = _kernel_cache.cache_path(cache_dir, f, info, opts.key(), x1, x2, params)
            cached = _kernel_cache.load_kernel(path)
            everywhere = (
                mesh is None or _mesh.is_local(mesh) or distributed.smallest(cached is not None)
            )  # on several processes, all read the cache or all compute (collectives)
            if cached is not None and everywhere:
                return cached
        if x2 is None and not opts.kernel.symmetric and num_rows(x1, "x1") > opts.sizes[0]:
            x2 = x1  # K(x1, x1) is not symmetric: every block, not a mirrored triangle
        blk = _blocks(f, info, opts, x1, x2, params, _mesh.axis_size(mesh, data_axis))
        n1, n2, b1, b2, tables = blk.n1, blk.n2, blk.b1, blk.b2, blk.tables
        symmetric = blk.x2 is None
        jobs = block_jobs(n1, n2, b1, b2, symmetric=symmetric, batch_diagonal=opts.batch_diagonal)
        limit = int(limit_fn())
        if mesh is not None and not _mesh.is_local(mesh):
            limit = distributed.smallest(limit)  # every process picks the same programs
        out = None

        def place(block, i, j):
            nonlocal out
            block = distributed.to_host(block)  # gathered from all processes of a mesh
            if tables and np.isnan(block).any():
                raise ConfigError(
                    "The eNTK block is NaN with the embedding tables compacted: f reads rows "
                    "beyond its input ids that model_info.embedding_rows does not list (add "
                    "them), or f's outputs are NaN."
                )
            out = place_block(out, block, i, j, n1, n2, symmetric=symmetric, opts=opts)

        if _reuse_jacobians(opts):
            # All rows compacted together: every block's Jacobians share one parametrization.
            p, xs = blk.params, [blk.x1] if symmetric else [blk.x1, blk.x2]
            if tables:
                p, xs = compact_block(info.embedding_rows, blk.params, xs, tables)
            trim = _padding.cuts(info.ignores_padding, xs[0])
            orders = None
            if trim and not (symmetric and n1 <= b1):  # several blocks: short rows together
                orders, xs = zip(*(_padding.sort_by_length(x) for x in xs), strict=True)
            cut = (lambda x: _padding.cut(x, skip_prefix=ROWS_PREFIX)) if trim else (lambda x: x)
            prepare = lambda x: on_mesh(cut(x))  # noqa: E731
            if mesh is not None:
                p = _mesh.params_on_mesh(p, mesh, fsdp_axis)
            if _kept_jacobians_kernel(
                blk.fn, blk.fn_key, opts, p, xs, (b1, b2), limit, prepare, place, progress
            ):
                if orders is not None:  # back to the callers' row order
                    out = _unsort(out, orders[0], orders[-1])
                if path is not None:
                    _kernel_cache.save_kernel(path, out)
                return out

        for i, j in _progress(jobs, progress):
            xa, xb, p = blk.block(i, j)
            if mesh is not None:
                xa, p = on_mesh(xa), _mesh.params_on_mesh(p, mesh, fsdp_axis)
                xb = None if xb is None else on_mesh(xb)
            exe = select_program(blk.fn, blk.fn_key, opts, xa, xb, p, limit, chosen)
            place(exe(xa, p) if xb is None else exe(xa, xb, p), i, j)
        if path is not None:
            _kernel_cache.save_kernel(path, out)
        return out

    return ntk_fn


def _reuse_jacobians(opts: KernelOptions) -> bool:
    """Whether the kernel is computed with Jacobians kept across blocks (:mod:`ntk._jacobians`):
    JACOBIAN_CONTRACTION on a per-example model (``vmap_axes=0``), not the batch diagonal."""
    return (
        opts.implementation == NtkImplementation.JACOBIAN_CONTRACTION
        and isinstance(opts.vmap_axes, int)
        and opts.vmap_axes == 0
        and not opts.batch_diagonal
    )


def _kept_jacobians_kernel(
    f, fn_key, opts: KernelOptions, params, xs, sizes, limit: int, prepare, place, progress
) -> bool:
    """Computes the kernel with Jacobians kept across blocks (:mod:`ntk._jacobians`), if it
    fits in ``limit``. A symmetric kernel of one block is one fused program, and so is an
    ``x1`` x ``x2`` kernel of one block each (their rows joined). ``prepare`` (or
    None) maps each block before use (cuts its padding). Returns whether it ran."""
    prepare = prepare or (lambda x: x)
    x1, x2 = xs[0], (xs[1] if len(xs) > 1 else None)
    n1 = num_rows(x1)
    if x2 is None and n1 <= sizes[0]:  # one block: Jacobians and their Gram in one program
        xa = prepare(x1)
        exe = fused_program(
            f, fn_key, opts.trace, opts.diag, xa, params, opts.kernel.signs, opts.layout
        )
        if required_bytes(exe) <= limit:
            place(exe(params, xa), 0, 0)
            return True
    if x2 is None and not opts.kernel.symmetric:  # one block too big: refused, smaller asked
        return False
    joined = _joined(x1, x2) if x2 is not None and n1 <= sizes[0] else None
    if joined is not None and num_rows(x2) <= sizes[1]:  # one block each: one program
        x = prepare(joined)
        exe = pair_program(
            f, fn_key, opts.trace, opts.diag, x, n1, params, opts.kernel.signs, opts.layout
        )
        if required_bytes(exe) <= limit:
            place(exe(params, x), 0, 0)
            return True
    if not _jacobians_fit(f, fn_key, params, x1, x2, sizes, opts, limit, prepare):
        return False
    reused_kernel(
        f,
        fn_key,
        params,
        x1,
        x2,
        sizes,
        opts.trace,
        opts.diag,
        place,
        lambda items: _progress(items, progress),
        prepare,
        opts.kernel.signs,
        opts.layout,
    )
    return True


def _joined(x1: PyTree, x2: PyTree) -> PyTree | None:
    """``x1`` and ``x2`` as one batch (rows of x1 first), or None if their leaves differ in
    anything but the number of rows."""
    l1, t1 = jax.tree.flatten(x1)
    l2, t2 = jax.tree.flatten(x2)
    if t1 != t2 or any(
        np.shape(a)[1:] != np.shape(b)[1:] or np.result_type(a) != np.result_type(b)
        for a, b in zip(l1, l2, strict=True)
    ):
        return None
    return jax.tree.unflatten(t1, [np.concatenate([a, b]) for a, b in zip(l1, l2, strict=True)])


def _unsort(out: np.ndarray, order1: np.ndarray, order2: np.ndarray) -> np.ndarray:
    """The kernel of rows ``x1[order1]`` x ``x2[order2]`` back in the rows' own order."""
    return out[np.argsort(order1)][:, np.argsort(order2)]


def _jacobians_fit(f, fn_key, params, x1, x2, sizes, opts, limit: int, prepare) -> bool:
    """Whether the kept Jacobians of x2 (x1 if None), one block of x1 and a contraction fit.

    Checked at each side's last block: the longest when rows are sorted by length."""
    rows2 = x1 if x2 is None else x2
    n2 = num_rows(rows2)
    b2 = sizes[0] if x2 is None else sizes[1]
    last2 = (n2 - 1) // b2 * b2
    signs = opts.kernel.signs
    xb = prepare(take_rows(rows2, last2, b2, n2))
    exe2 = jacobian_program(f, fn_key, xb, params, signs[1], opts.layout)
    # The kept Jacobians, plus the temporaries of the program making them (its output is one
    # of the kept blocks: counted once).
    blocks2 = -(-n2 // b2)
    need = blocks2 * jacobian_bytes(exe2) + required_bytes(exe2) - jacobian_bytes(exe2)
    if x2 is not None:  # the program of an x1 block takes every kept block as an argument
        n1 = num_rows(x1)
        xa = prepare(take_rows(x1, (n1 - 1) // sizes[0] * sizes[0], sizes[0], n1))
        num_outputs = jax.eval_shape(f, params, xa).shape[1]
        kept = [kept_spec(params, b2, num_outputs)] * blocks2
        exe = cross_program(
            f, fn_key, opts.trace, opts.diag, xa, kept, params, signs[0], opts.layout
        )
        need = max(need, required_bytes(exe))
    return need <= limit


def _progress(jobs: list, show: bool):
    if not show:
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="eNTK blocks", unit="block")


def kernel_matrix(k: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Flattens a ``[N1, N2, K, K]`` kernel into the ``[N1*K, N2*K]`` matrix (row = (n, k)).

    A ``[N1, N2]`` (traced) kernel is returned as is.
    """
    if k.ndim == 2:
        return k
    if k.ndim != 4:
        raise ConfigError(
            f"kernel_matrix expects a [N1, N2] or [N1, N2, K, K] kernel; got shape {k.shape}: "
            "pass an empirical_ntk_fn kernel without diagonal_axes."
        )
    n1, n2, k1, k2 = k.shape
    xp = jnp if isinstance(k, jax.Array) else np
    return xp.transpose(k, (0, 2, 1, 3)).reshape(n1 * k1, n2 * k2)  # (N1 K, N2 K)
