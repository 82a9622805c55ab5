"""Kernel models: a model as a function of one parameter subset, ``f(sub_params, batch) -> [N, K]``.

The NTK tools differentiate with respect to one pytree. A fine-tuned encoder has many: all
weights, a regex-chosen subset (``.*attention.*kernel``), or LoRA adapters on a frozen base.
:func:`kernel_model` and :func:`lora_kernel_model` close over everything that is not
differentiated and return a :class:`KernelModel` ``(f, params, info)``: ``f(params, batch) ->
[N, K]``, the subset's current values, and a :class:`ModelInfo` saying what the kernel may
exploit about ``f`` (its content hash for the caches, the embedding rows it reads besides its
input ids, whether it ignores trailing padding). The info is data: pass it to
:func:`ntk.empirical_ntk_fn` as ``model_info=``; nothing is read from attributes of ``f``, so
wrapping ``f`` (``jax.jit``, ``functools.partial``, a lambda) loses nothing.

Example (a sketch: ``output_fn``, ``base_params`` and ``train_batch`` are the caller's):
  >>> f, adapters, info = ntk.lora_kernel_model(  # doctest: +SKIP
  ...     output_fn, base_params, adapters, lora_cfg
  ... )
  >>> ntk_fn = ntk.empirical_ntk_fn(f, trace_axes=(), model_info=info)  # doctest: +SKIP
  >>> k = ntk_fn(train_batch, None, adapters)  # (N, N, K, K)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import params as params_lib
from lora_jax.capabilities import capabilities_of
from lora_jax.errors import ConfigError

PyTree = Any
Batch = Mapping[str, Any]
OutputFn = Callable[..., jax.Array]

__all__ = [
    "FingerprintError",
    "KernelModel",
    "ModelInfo",
    "cast_floating",
    "check_outputs",
    "fingerprint",
    "fn_fingerprint",
    "kernel_model",
    "lora_kernel_model",
]


class ModelInfo(NamedTuple):
    """What the eNTK may exploit about a model function ``f``, passed explicitly.

    The default ``ModelInfo()`` assumes nothing: ``f`` is hashed by its code and closure, its
    embedding tables are kept dense and its batches are not cut.
    """

    # What f computes, for the kernel and program caches (a string naming everything f depends
    # on); None: the content hash of f's code and closure (fn_fingerprint).
    fingerprint: str | None = None
    # shape=(E,), int32: the embedding rows f reads besides its input ids (e.g. label words);
    # None: f's embedding tables are not compacted (ntk.compact).
    embedding_rows: np.ndarray | None = None
    # f's outputs do not change with trailing padding, so kernel blocks may be cut to their
    # longest row (ntk._padding); needs an `attention_mask` [N, T] in the batch.
    ignores_padding: bool = False


class KernelModel(NamedTuple):
    """A model as a function of one parameter subset, with what its kernel may exploit."""

    f: Callable[[PyTree, Batch], jax.Array]  # f(params, batch) -> outputs [N, K].
    params: PyTree  # the subset's values (the point to linearize / take the kernel at).
    info: ModelInfo  # pass as empirical_ntk_fn(f, model_info=info).


def fingerprint(tree: PyTree, *extra: object) -> str:
    """A sha256 hex digest of a pytree's structure, leaf dtypes, shapes and bytes (+ ``extra``).

    Used as the content hash of the on-disk kernel cache. Leaves are fetched to host memory.
    """
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    h.update(str(jax.tree_util.tree_structure(tree)).encode())
    del treedef
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()


class FingerprintError(ConfigError):
    """A function closes over a value whose content cannot be hashed (needed by the cache)."""


def fn_fingerprint(fn: Callable) -> str:
    """A sha256 hex digest of what ``fn`` computes: its code and every value it closes over.

    Covers the code objects (bytecode, constants, names), default arguments, closure cells,
    ``functools.partial`` arguments, bound ``self`` and jitted functions' wrapped function,
    recursively; arrays by content, dataclasses / NamedTuples / containers field by field. So two
    readouts with the same code and different label words (a verbalizer ablation) differ.

    Raises:
      FingerprintError: if ``fn`` closes over an object with no content to hash (its ``repr``
        holds a memory address); pass ``model_info=ntk.ModelInfo(fingerprint=...)``, a string
        naming everything it depends on, to :func:`ntk.empirical_ntk_fn` instead.
    """
    h = hashlib.sha256()
    _hash_value(h, fn, set(), "fn")
    return h.hexdigest()


def _hash_value(h, value: Any, seen: set[int], where: str) -> None:  # noqa: C901 - a type switch
    """Feeds ``value``'s content into ``h`` (see :func:`fn_fingerprint`)."""
    update = lambda *items: h.update(repr(items).encode())  # noqa: E731
    if value is None or isinstance(value, bool | int | float | complex | str | bytes | enum.Enum):
        update(type(value).__name__, value)
        return
    if id(value) in seen:  # a cycle (a recursive closure): the name is enough
        update("seen", type(value).__name__)
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        h.update(fingerprint(value).encode())
    elif isinstance(value, types.FunctionType):
        update("fn", value.__module__, value.__qualname__)
        _hash_value(h, value.__code__, seen, where)
        for item in (value.__defaults__, value.__kwdefaults__):
            _hash_value(h, item, seen, where)
        for name, cell in zip(value.__code__.co_freevars, value.__closure__ or (), strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned after the function was made)
                content = None
            _hash_value(h, content, seen, f"{value.__qualname__}.{name}")
    elif isinstance(value, types.CodeType):
        update("code", value.co_code, value.co_names, value.co_varnames)
        for const in value.co_consts:
            _hash_value(h, const, seen, where)
    elif isinstance(value, functools.partial):
        update("partial")
        for item in (value.func, value.args, value.keywords):
            _hash_value(h, item, seen, where)
    elif isinstance(value, types.MethodType):
        update("method")
        _hash_value(h, value.__func__, seen, where)
        _hash_value(h, value.__self__, seen, where)
    elif isinstance(value, types.BuiltinFunctionType | types.ModuleType | type):
        update(
            "named",
            getattr(value, "__module__", ""),
            getattr(value, "__qualname__", None) or value.__name__,
        )
    elif hasattr(value, "__wrapped__") and callable(value):  # jax.jit, functools.wraps
        update("wrapped", type(value).__name__)
        _hash_value(h, value.__wrapped__, seen, where)
    elif dataclasses.is_dataclass(value):
        update("dataclass", type(value).__qualname__)
        for field in dataclasses.fields(value):
            _hash_value(h, (field.name, getattr(value, field.name)), seen, where)
    elif isinstance(value, Mapping):
        update("map", type(value).__qualname__, len(value))
        for key in sorted(value, key=repr):
            _hash_value(h, (key, value[key]), seen, where)
    elif isinstance(value, tuple | list | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        update("seq", type(value).__qualname__, len(value))
        for item in items:
            _hash_value(h, item, seen, where)
    elif " at 0x" not in repr(value):
        update("repr", type(value).__qualname__, repr(value))
    else:
        raise FingerprintError(
            f"The kernel cache cannot hash what the function depends on: {where} is a "
            f"{type(value).__qualname__} with no content to hash. Pass "
            "empirical_ntk_fn(f, model_info=ntk.ModelInfo(fingerprint='<a string naming "
            "everything f depends on>')), or drop cache_dir."
        )


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """Casts the floating-point leaves of ``tree`` to ``dtype`` (None: unchanged).

    Raises:
      ConfigError: if ``dtype`` is float64 while ``jax_enable_x64`` is off (jax would silently
        keep float32).
    """
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError(
            "dtype=float64 needs 64-bit jax: run under `with jax.enable_x64():` or call "
            "`jax.config.update('jax_enable_x64', True)` at startup."
        )

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, dtype)
        return x

    return jax.tree.map(cast, tree)


def check_outputs(outputs: Any, batch: Batch | None = None, *, where: str = "f") -> jax.Array:
    """Checks that ``outputs`` is one ``[N, K]`` array (N = the batch's leading size).

    Raises:
      ConfigError: naming what was got and what is expected.
    """
    if not hasattr(outputs, "shape") or not hasattr(outputs, "ndim"):
        raise ConfigError(
            f"{where} must return one array of shape [N, K]; got {type(outputs).__name__}. "
            "Return the K logits per example (e.g. from make_output_fn)."
        )
    if outputs.ndim != 2:
        raise ConfigError(
            f"{where} must return outputs of shape [N, K]; got shape {tuple(outputs.shape)}. "
            "Reduce to the K label-word / class logits per example."
        )
    if batch is not None:
        sizes = {x.shape[0] for x in jax.tree.leaves(batch) if getattr(x, "ndim", 0) >= 1}
        if sizes and outputs.shape[0] not in sizes:
            raise ConfigError(
                f"{where} returned {outputs.shape[0]} rows for a batch with leading size(s) "
                f"{sorted(sizes)}; expected one row per example."
            )
    return outputs


def _checked(f: Callable, where: str) -> Callable:
    def checked(params, batch, *args, **kwargs):
        return check_outputs(f(params, batch, *args, **kwargs), batch, where=where)

    return checked


def _output_info(output_fn: Callable, fingerprint_: str, *, tables: bool) -> ModelInfo:
    """The :class:`ModelInfo` of a kernel model of ``output_fn``.

    From the capabilities ``output_fn`` declares (:mod:`lora_jax.capabilities`;
    :func:`lora_jax.readout.make_output_fn` declares them for this library's encoders):
    ``embedding_rows`` (when ``tables``: the subset can hold embedding tables, so the rows
    matter) and ``ignores_padding``.
    """
    declared = capabilities_of(output_fn)
    rows = declared.embedding_rows if tables else None
    return ModelInfo(
        fingerprint=fingerprint_,
        embedding_rows=None if rows is None else np.asarray(rows, np.int32),
        ignores_padding=declared.ignores_padding,
    )


def kernel_model(
    output_fn: OutputFn,
    params: PyTree,
    subset: str | Callable[[str], bool] = "all",
    *,
    dtype: Any = None,
) -> KernelModel:
    """Restricts ``output_fn(params, batch) -> [N, K]`` to a subset of its parameters.

    Args:
      output_fn: the model, ``output_fn(params, batch) -> [N, K]`` (extra arguments such as
        ``dropout_rng`` keep their defaults: deterministic).
      params: the full nested-dict parameters (``lora_jax`` layout).
      subset: ``'all'``, a regex searched in each leaf's dotted path (module path + leaf name,
        e.g. ``r'.*attention.*kernel'`` or ``r'encoder\\.layer\\.5\\.'``), or a predicate on
        the dotted path.
      dtype: if given (e.g. ``jnp.float64``), floating leaves of every parameter are cast.

    Returns:
      ``KernelModel(f, sub_params, info)``: ``f(sub_params, batch) -> [N, K]`` with the other
      leaves closed over; ``info`` its content hash, the embedding rows and padding behaviour
      ``output_fn`` declares (see :class:`ModelInfo`).

    Raises:
      ConfigError: if the pattern selects nothing (the message lists real paths), or if
        ``output_fn`` does not return ``[N, K]``.
    """
    params = cast_floating(params, dtype)
    if isinstance(subset, str) and subset == "all":
        f = _checked(output_fn, "output_fn")
        key = fingerprint({}, fn_fingerprint(output_fn), "all")
        return KernelModel(f, params, _output_info(output_fn, key, tables=True))
    selected, rest = params_lib.partition(params, subset)

    def f(sub_params, batch):
        return output_fn(params_lib.combine(sub_params, rest), batch)

    key = fingerprint(rest, fn_fingerprint(output_fn), "subset")
    info = _output_info(output_fn, key, tables=True)
    return KernelModel(_checked(f, "output_fn"), selected, info)


def lora_kernel_model(
    output_fn: OutputFn,
    params: PyTree,
    adapters: PyTree,
    lora_config: Any,
    *,
    dtype: Any = None,
) -> KernelModel:
    """The model as a function of its LoRA adapters: ``f(a, x) = output_fn(apply(W, a), x)``.

    Args:
      output_fn: the model, ``output_fn(params, batch) -> [N, K]``.
      params: the frozen base parameters W0 (closed over).
      adapters: the adapters pytree (``lora_jax.lora.init``), the point of the returned subset.
      lora_config: the ``lora_jax.lora.LoraConfig`` the adapters were made with.
      dtype: if given, floating leaves of base params and adapters are cast.

    Returns:
      ``KernelModel(f, adapters, info)`` (no embedding rows in ``info``: adapters hold no
      embedding table).
    """
    from lora_jax import lora  # lazy: ntk's generic parts work without the LoRA module

    params = cast_floating(params, dtype)
    adapters = cast_floating(adapters, dtype)

    def f(adapters, batch):
        return output_fn(lora.apply(params, adapters, lora_config), batch)

    key = fingerprint(params, fn_fingerprint(output_fn), "lora", repr(lora_config))
    info = _output_info(output_fn, key, tables=False)
    return KernelModel(_checked(f, "output_fn"), adapters, info)
