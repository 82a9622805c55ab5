"""Logical axis names, rule tables and meshes: where every array of a run lives on the devices.

Model code knows only *logical* axis names (``embed``, ``heads``, ``mlp``, ``vocab``,
``lora_rank``, ``batch``, ``adapter``); one small table of plain data, in the style of
MaxText's ``logical_axis_rules``, maps each name to an ordered tuple of *mesh* axes (``()`` =
replicated). Changing the parallelism means changing the table, not the model.

* :func:`leaf_axes` names the axes of a parameter from its dotted path (HF module names), the
  one heuristic that both the models and :mod:`lora_jax.lora` use. LoRA factors inherit their
  kernel's names: ``lora_a`` is ``(kernel_in, 'lora_rank')``, ``lora_b`` ``('lora_rank',
  kernel_out)``, so under any table they are split exactly like the kernel they adapt and the
  rank is never split. A leading extra axis (a stack of sweep members) is named ``adapter``.
* :func:`rules` builds a table from presets (``dp``, ``fsdp``, ``tp``, ``adapter``, joined with
  ``+``); :func:`rules_for_mesh` picks the presets of the axes a mesh has.
* :func:`make_mesh` builds a mesh from ``"data=4,fsdp=2"``; :func:`tree_shardings` maps any
  pytree whose leaves sit under HF-style dict keys (base params, adapters, a ``TrainState`` with
  its optimizer state) to ``NamedSharding`` s; :func:`describe` prints where each leaf lives.

No catch-all rule: a logical name without a rule is an error, never silently replicated.

Example:
  >>> mesh = make_mesh("data=1")
  >>> table = rules_for_mesh(mesh)
  >>> table["batch"], table["embed"]
  (('data',), ())
  >>> leaf_axes("roberta.encoder.layer.0.attention.self.query.lora_a", 2)
  ('embed', 'lora_rank')
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lora_jax.errors import ConfigError

PyTree = Any
Rules = Mapping[str, tuple[str, ...]]

LOGICAL_AXES = ("batch", "embed", "heads", "mlp", "vocab", "lora_rank", "adapter")
MESH_AXES = ("data", "fsdp", "tensor")  # in the order a mesh lays them out (outer to inner)

# Each preset lists only the names it splits; every other name is replicated. Joining presets
# appends their mesh axes per name, in order ("dp+fsdp": batch -> ("data", "fsdp")).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Data parallel over `data`: a job of one run splits each batch, a job of several runs
    # (``train.fit_job``) splits its members (the leading `adapter` axis of its state and data)
    # and leaves each member's batch whole; parameters and optimizer state replicated.
    "dp": {"batch": ("data",), "adapter": ("data",)},
    # FSDP: the batch over `fsdp` too, and weights stored split along `embed` (gathered by XLA
    # for each matmul, Levanter's parameter vs compute mapping).
    "fsdp": {"batch": ("fsdp",), "embed": ("fsdp",)},
    # Tensor parallel (Megatron): attention heads, MLP width and vocabulary over `tensor`.
    "tp": {"heads": ("tensor",), "mlp": ("tensor",), "vocab": ("tensor",)},
}
_MESH_PRESET = {"data": "dp", "fsdp": "fsdp", "tensor": "tp"}


def rules(preset: str = "dp") -> dict[str, tuple[str, ...]]:
    """The rule table of ``preset``: one of :data:`PRESETS` or several joined by ``+``.

    Returns:
      ``{logical name: mesh axes}`` with an entry for every name in :data:`LOGICAL_AXES`.

    Raises:
      ValueError: an unknown preset.
    """
    table: dict[str, tuple[str, ...]] = {name: () for name in LOGICAL_AXES}
    for name in preset.split("+"):
        if name not in PRESETS:
            raise ConfigError(
                f"Unknown sharding preset {name!r}; expected some of {list(PRESETS)}."
            )
        for logical, axes in PRESETS[name].items():
            table[logical] = table[logical] + tuple(a for a in axes if a not in table[logical])
    return table


def rules_for_mesh(mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """The default table for ``mesh``: ``dp`` / ``fsdp`` / ``tp`` for each of its axes."""
    presets = [_MESH_PRESET[a] for a in MESH_AXES if a in mesh.axis_names]
    return rules("+".join(presets)) if presets else {name: () for name in LOGICAL_AXES}


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}`` (checked names and sizes)."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ConfigError(
                f"Unknown mesh axis {name!r} in mesh {spec!r}; mesh axes are {list(MESH_AXES)} "
                "(e.g. 'data=4,fsdp=2')."
            )
        if not eq or not size.strip().isdigit() or int(size) < 1:
            raise ConfigError(f"Mesh axis {part!r} in {spec!r} needs a size >= 1, e.g. 'data=4'.")
        if name in shape:
            raise ConfigError(f"Mesh axis {name!r} appears twice in mesh {spec!r}.")
        shape[name] = int(size)
    if not shape:
        raise ConfigError(f"Mesh {spec!r} names no axis; e.g. 'data=4' or 'data=2,fsdp=2'.")
    return shape


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all devices (of every process) from ``"data=4,fsdp=2"`` or a dict.

    Axes are laid out in the order of :data:`MESH_AXES` (``data`` outermost), with
    ``AxisType.Auto`` (XLA propagates shardings between the annotated inputs and outputs).
    ``jax.make_mesh`` may order the devices physically (TPU slices), so a process's devices need
    not hold contiguous rows of the batch; :func:`place_data` does not assume they do.

    Raises:
      ValueError: an unknown axis name, or sizes whose product is not the device count.
    """
    shape = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    names = tuple(a for a in MESH_AXES if a in shape)
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(shape[a] for a in names)
    if math.prod(sizes) != len(devices):
        text = ",".join(f"{a}={shape[a]}" for a in names)
        raise ConfigError(
            f"Mesh {text} has {math.prod(sizes)} devices but {len(devices)} are present; make "
            f"the axis sizes multiply to {len(devices)} (e.g. --mesh data={len(devices)})."
        )
    return jax.make_mesh(
        sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=np.asarray(devices)
    )


def check_rules(table: Rules, mesh: Mesh) -> None:
    """Raises ValueError if a rule names a mesh axis that ``mesh`` does not have."""
    for logical, axes in table.items():
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ConfigError(
                    f"Sharding rule {logical!r} -> {axis!r} names mesh axis {axis!r}, which the "
                    f"mesh ({_mesh_text(mesh)}) does not have; add {axis}=... to the mesh or "
                    "drop it from the rule."
                )


def _mesh_text(mesh: Mesh) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items())


# --------------------------------------------------------------------------------------------
# Logical names of parameters (the heuristic over HF module paths)
# --------------------------------------------------------------------------------------------


def _linear_axes(module: str) -> tuple[Any, Any]:
    """(in, out) logical axes of the Linear at dotted path ``module``."""
    last = module.rsplit(".", 1)[-1]
    if last in _QKV:
        return ("embed", "heads")
    if module.endswith("attention.output.dense"):
        return ("heads", "embed")
    if module.endswith("intermediate.dense"):
        return ("embed", "mlp")
    if ".layer." in module and module.endswith("output.dense"):
        return ("mlp", "embed")
    if last in ("decoder", "generator_lm_head"):
        return ("embed", "vocab")
    if last in ("embeddings_project", "embed_proj"):  # ELECTRA / DeBERTa (E, H) projections
        return (None, "embed")
    return ("embed", None)  # pooler, head transforms, classifiers


# Attention input projections: BERT-style, and DeBERTa's (with its relative-position ones).
_QKV = ("query", "key", "value", "query_proj", "key_proj", "value_proj")
_QKV += ("pos_key_proj", "pos_query_proj")


def leaf_axes(path: str, ndim: int) -> tuple:
    """Logical axis names of the leaf at dotted ``path`` with ``ndim`` dimensions.

    Covers base weights and LoRA leaves: ``lora_a`` is ``(in, 'lora_rank')``, ``lora_b``
    ``('lora_rank', out)`` with ``in`` / ``out`` those of the adapted kernel, ``lora_scale``
    ``()``. One dimension more than expected is a leading stack of sweep members
    (``'adapter'``). ``None`` marks a dimension no rule splits (e.g. the label axis of a
    classifier); leaves this heuristic does not know are replicated (see :func:`describe`).
    """
    module, _, leaf = path.rpartition(".")
    last = module.rsplit(".", 1)[-1]
    axes: tuple = ()
    if leaf == "embedding":
        axes = ("vocab", "embed") if last == "word_embeddings" else (None, "embed")
    elif last in ("LayerNorm", "layer_norm"):
        axes = ("embed",)
    elif leaf == "bias" and last in ("lm_head", "predictions", "generator_lm_head"):
        axes = ("vocab",)
    elif leaf in ("kernel", "bias", "lora_a", "lora_b"):
        ax_in, ax_out = _linear_axes(module)
        axes = {
            "kernel": (ax_in, ax_out),
            "bias": (ax_out,),
            "lora_a": (ax_in, "lora_rank"),
            "lora_b": ("lora_rank", ax_out),
        }[leaf]
    if axes and len(axes) == ndim:
        return axes
    if axes and len(axes) + 1 == ndim:
        return ("adapter", *axes)
    return (None,) * ndim


def _dotted(key_path: tuple) -> str:
    """The dict keys of a pytree key path joined by dots (attribute / index keys skipped).

    So a leaf of ``TrainState.opt_state[0].mu['enc.query']['lora_a']`` has the path of the
    adapter leaf it mirrors, ``enc.query.lora_a``.
    """
    return ".".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def logical_axes(tree: PyTree) -> PyTree:
    """Logical axis names of every leaf of ``tree`` (same structure), by :func:`leaf_axes`.

    ``tree`` is base params (nested dicts), adapters (``{path: {leaf: array}}``), or anything
    holding them under dict keys (a ``TrainState`` with its optimizer state).
    """
    return jax.tree_util.tree_map_with_path(lambda kp, x: leaf_axes(_dotted(kp), np.ndim(x)), tree)


# --------------------------------------------------------------------------------------------
# From logical names to shardings
# --------------------------------------------------------------------------------------------


def spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, table: Rules, *, where: str = ""
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical ``axes`` and ``shape`` under ``table``.

    A dimension whose size the mesh axes do not divide is replicated, with a warning naming it
    (e.g. RoBERTa's odd vocabulary of 50,265 under ``tensor=2``).

    Raises:
      ValueError: a logical name without a rule, a rule naming a mesh axis the mesh lacks, or a
        mesh axis used by two dimensions of one array.
    """
    parts: list[Any] = []
    used: set[str] = set()
    for dim, (name, size) in enumerate(zip(axes, shape, strict=True)):
        if name is None:
            parts.append(None)
            continue
        if name not in table:
            raise ConfigError(
                f"{where or 'An array'} has logical axis {name!r}, which has no sharding rule "
                f"(rules exist for {sorted(table)}); add e.g. {name!r}: () (replicated)."
            )
        mesh_axes = tuple(table[name])
        check_rules({name: mesh_axes}, mesh)
        if clash := used & set(mesh_axes):
            raise ConfigError(
                f"{where or 'An array'}: mesh axis {sorted(clash)[0]!r} shards two of its "
                f"dimensions (logical axes {tuple(axes)}); change the rules so each mesh axis "
                "splits at most one dimension."
            )
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            warnings.warn(
                f"{where or 'array'}: dimension {dim} ({name!r}, size {size}) is not divisible "
                f"by {'x'.join(mesh_axes)}={ways}; it is replicated.",
                stacklevel=2,
            )
            parts.append(None)
            continue
        used |= set(mesh_axes)
        parts.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*parts)


def tree_shardings(tree: PyTree, mesh: Mesh, table: Rules) -> PyTree:
    """``NamedSharding`` of every leaf of ``tree`` (params, adapters, a ``TrainState``, ...).

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    """
    check_rules(table, mesh)

    def one(kp, x):
        path = _dotted(kp)
        axes = leaf_axes(path, np.ndim(x))
        return NamedSharding(mesh, spec(axes, np.shape(x), mesh, table, where=path or "leaf"))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, table: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of an array whose first dimension is the batch (or example) axis."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, spec(axes, shape, mesh, table, where="batch"))


def batch_ways(mesh: Mesh, table: Rules) -> int:
    """Number of shards of the batch dimension under ``table``."""
    return math.prod(mesh.shape[a] for a in table.get("batch", ()))


def data_shardings(data: Mapping[str, Any], mesh: Mesh, table: Rules) -> dict:
    """Batch shardings of a dict of ``[N, ...]`` arrays; replicated where N is not divisible."""
    ways = batch_ways(mesh, table)
    return {
        k: batch_sharding(mesh, table, np.shape(x))
        if np.shape(x) and np.shape(x)[0] % ways == 0
        else NamedSharding(mesh, PartitionSpec())
        for k, x in data.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Puts every leaf of ``tree`` on its sharding, on one process or several.

    Host values (numpy, or arrays of this process) must be the same on every process: each
    process fills only the shards of its own devices. Global arrays are resharded.
    """

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == s else jax.device_put(x, s)
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def place_data(data: Mapping[str, Any], mesh: Mesh, table: Rules) -> dict:
    """Puts a dict of ``[N, ...]`` arrays on the mesh, split over the batch axes.

    ``data`` is this process's copy of the whole set (the few-shot sets are sampled
    deterministically, so every process has it); on several processes each process fills the
    shards of its own devices from it (:func:`place`), whatever rows those are. A mesh need not
    give each process one contiguous block of rows: on TPU slices ``jax.make_mesh`` orders the
    devices physically (on a v4-32 the data axis runs over processes 0, 1, 2, 3, 0, 1, ...).
    """
    return place(dict(data), data_shardings(data, mesh, table))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def describe(tree: PyTree, mesh: Mesh, table: Rules, *, limit: int | None = None) -> str:
    """A markdown table: path, shape, logical axes, spec and bytes per device of each leaf.

    Sorted by bytes per device (largest first), so a large replicated weight is at the top; the
    last line gives the total bytes per device and how much of it is replicated.
    """
    shardings = tree_shardings(tree, mesh, table)
    rows, total, repl = [], 0, 0
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for (kp, x), s in zip(leaves, jax.tree.leaves(shardings), strict=True):
        path = _dotted(kp) or jax.tree_util.keystr(kp)
        nbytes = int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        ways = math.prod(
            mesh.shape[a]
            for p in s.spec
            if p is not None
            for a in ((p,) if isinstance(p, str) else p)
        )
        per_device = nbytes // ways
        total += per_device
        repl += per_device if ways == 1 else 0
        axes = leaf_axes(_dotted(kp), np.ndim(x))
        rows.append((per_device, path, tuple(np.shape(x)), axes, tuple(s.spec)))
    rows.sort(key=lambda r: (-r[0], r[1]))
    lines = [
        f"mesh {_mesh_text(mesh)}",
        "| path | shape | logical | spec | bytes/device |",
        "|---|---|---|---|---:|",
    ]
    for per_device, path, shape, axes, sp in rows[:limit]:
        lines.append(f"| {path} | {shape} | {axes} | {sp} | {per_device:,} |")
    if limit is not None and len(rows) > limit:
        lines.append(f"| ... {len(rows) - limit} more | | | | |")
    lines.append(f"total {total:,} bytes per device, {repl:,} of them in replicated leaves")
    return "\n".join(lines)
