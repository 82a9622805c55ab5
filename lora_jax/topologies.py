"""Compile for a TPU slice or an NVIDIA GPU node on a machine without one: compile-only devices,
and what the compiled program says about memory, FLOPs and collectives.

``jax.experimental.topologies.get_topology_desc`` gives the devices of any TPU slice, several
hosts included (with the ``libtpu`` wheel of the ``tpu`` extra), or of NVIDIA GPU nodes of one or
two hosts (with the CUDA plugin of the ``cuda-plan`` extra and a target description of the GPU,
:func:`gpu_target_config`), as compile-only devices; a mesh over them and
``jax.ShapeDtypeStruct`` inputs with ``NamedSharding`` s are enough to
``jax.jit(f).lower(...).compile()`` the program a slice or node would run. :func:`analyze` reads
the compiled program: XLA's memory analysis per device, and, from the optimized HLO text, the
matmul FLOPs, HBM traffic and collectives of one execution, every loop body counted as many
times as its loop runs (XLA's own ``cost_analysis`` counts a body once, and returns nothing for
a compile-only GPU). :func:`roofline` turns FLOPs and bytes into a time from the chip's peak
(:data:`CHIPS`).

Nothing here runs on a chip: it checks sharding, memory and collectives of the exact program,
not its speed (the roofline is a lower bound, communication left out). A compile-only GPU has
no autotuning: XLA picks its default kernels, so the GPU program is the one a GPU would run up
to kernel choice.

Example:
  >>> from lora_jax import topologies
  >>> topologies.TARGETS["v4-32"].hosts, topologies.TARGETS["v4-32"].chips
  (4, 16)
  >>> topologies.TARGETS["h100-16"].hosts, topologies.TARGETS["h100-16"].chips
  (2, 16)
  >>> devices = topologies.devices("v4-32")  # doctest: +SKIP
"""

from __future__ import annotations

import enum
import importlib.util
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from lora_jax.errors import ConfigError, UserError

__all__ = [
    "CHIPS",
    "TARGETS",
    "Chip",
    "Collective",
    "Platform",
    "ProgramReport",
    "Target",
    "analyze",
    "collectives",
    "cuda_plan_available",
    "devices",
    "gpu_target_config",
    "hlo_costs",
    "install_hint",
    "libtpu_available",
    "roofline",
]

GIB = 2**30


class Chip(NamedTuple):
    """Public peak figures of one accelerator chip (one JAX device)."""

    name: str
    hbm_bytes: int  # HBM per chip (for a GPU: the memory the device reports).
    peak_flops: float  # dense bf16 matmul FLOP/s per chip.
    hbm_bandwidth: float  # bytes/s per chip.


# Sources (vendor pages, read 2026-12):
#   TPU v4:  cloud.google.com/tpu/docs/v4  -- 275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s.
#   TPU v5e: cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s.
#   TPU v5p: cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s.
#   H100 SXM: nvidia.com/en-us/data-center/h100 datasheet -- 989 TFLOP/s bf16 dense (1,979 with
#     sparsity), 80 GB HBM3 (84,942,979,072 bytes as the device reports it), 3.35 TB/s.
#   A100 SXM 80GB: nvidia.com/en-us/data-center/a100 datasheet -- 312 TFLOP/s bf16 dense, 80 GB
#     HBM2e (85,100,068,864 bytes as the device reports it), 2,039 GB/s.
# A v4 / v5p chip has two TensorCores that JAX shows as one device ("megacore").
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200e9),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "h100": Chip("NVIDIA H100 SXM", 84_942_979_072, 989e12, 3.35e12),
    "a100": Chip("NVIDIA A100 SXM 80GB", 85_100_068_864, 312e12, 2.039e12),
}


class Platform(enum.Enum):
    """Which compile-only devices a :class:`Target` has, and which package provides them."""

    TPU = "tpu"  # libtpu (the ``tpu`` extra)
    CUDA = "cuda"  # the CUDA PJRT plugin (the ``cuda-plan`` extra)


class Target(NamedTuple):
    """A TPU slice by its Cloud name (``v4-32``), or NVIDIA GPU nodes (``h100-8``): what
    ``get_topology_desc`` takes."""

    name: str
    chip: Chip
    # TPU: e.g. "v4:2x2x4" (chips per dimension), as in MaxText's accelerator map.
    # CUDA: "<partitions>x<hosts>x<GPUs per host>", e.g. "1x2x8" for two 8-GPU nodes.
    topology: str
    chip_config: str  # TPU: "megacore" (v4, v5p) or "default" (v5e); CUDA: the chip's key
    host_bounds: tuple[int, ...]  # TPU: chips per host along each dimension; CUDA: ()
    chips: int
    hosts: int
    platform: Platform = Platform.TPU


def _slice(name: str, chip: str, topology: str, host_bounds: tuple[int, int, int]) -> Target:
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    chips = math.prod(dims)
    config = "default" if chip == "v5e" else "megacore"
    return Target(
        name, CHIPS[chip], topology, config, host_bounds, chips, chips // math.prod(host_bounds)
    )


def _gpu_nodes(chip: str, hosts: int, per_host: int = 8) -> Target:
    """``hosts`` nodes of ``per_host`` GPUs each (NVLink within a node), named by the GPU count."""
    return Target(
        f"{chip}-{hosts * per_host}", CHIPS[chip], f"1x{hosts}x{per_host}", chip, (),
        hosts * per_host, hosts, Platform.CUDA,
    )  # fmt: skip


# Cloud names count TensorCores for v4 / v5p (two per chip) and chips for v5e; GPU targets
# count GPUs, 8 per node (e.g. GCP a3-highgpu-8g, AWS p5.48xlarge, DGX H100).
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _slice("v4-8", "v4", "v4:2x2x1", (2, 2, 1)),
        _slice("v4-16", "v4", "v4:2x2x2", (2, 2, 1)),
        _slice("v4-32", "v4", "v4:2x2x4", (2, 2, 1)),
        _slice("v4-64", "v4", "v4:2x4x4", (2, 2, 1)),
        _slice("v5e-8", "v5e", "v5e:2x4", (2, 4, 1)),
        _slice("v5e-16", "v5e", "v5e:4x4", (2, 2, 1)),
        _slice("v5e-32", "v5e", "v5e:4x8", (2, 2, 1)),
        _slice("v5p-8", "v5p", "v5p:2x2x1", (2, 2, 1)),
        _slice("v5p-16", "v5p", "v5p:2x2x2", (2, 2, 1)),
        _gpu_nodes("h100", 1),
        _gpu_nodes("h100", 2),
        _gpu_nodes("a100", 1),
        _gpu_nodes("a100", 2),
    )
}


class _GpuSpec(NamedTuple):
    """What XLA's GPU compiler reads of a device (``stream_executor.GpuTargetConfigProto``)."""

    description: str  # the device name CUDA reports
    compute_capability: tuple[int, int]
    cores: int  # streaming multiprocessors
    fpus_per_core: int
    shared_memory_per_core: int  # bytes
    shared_memory_per_block_optin: int  # bytes
    l2_cache_bytes: int
    clock_ghz: float
    cudnn: tuple[int, int, int]


# From NVIDIA's Hopper / Ampere tuning guides and datasheets (SM count, shared memory per SM
# and per block, L2 size, boost clock) and the device sizes of ``CHIPS``; XLA keeps the same
# descriptions as target configs (openxla/xla ``xla/backends/gpu/target_config/specs/``
# ``h100_sxm.txtpb``, ``a100_sxm_80.txtpb``).
_GPU_SPECS: dict[str, _GpuSpec] = {
    "h100": _GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 50 * 2**20, 1.98,
                     (9, 8, 0)),
    "a100": _GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 40 * 2**20, 1.41,
                     (9, 8, 0)),
}  # fmt: skip


def gpu_target_config(chip: str) -> str:
    """The ``GpuTargetConfigProto`` text (protobuf text format) that the CUDA plugin compiles for
    when no GPU is attached: the device of ``CHIPS[chip]`` (``"h100"``, ``"a100"``)."""
    spec, info = _GPU_SPECS[chip], CHIPS[chip]
    major, minor = spec.compute_capability
    return "\n".join(
        (
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            f"  shared_memory_per_core: {spec.shared_memory_per_core}",
            "  threads_per_core_limit: 2048",
            f"  core_count: {spec.cores}",
            f"  fpus_per_core: {spec.fpus_per_core}",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {int(info.hbm_bandwidth)}",
            f"  l2_cache_size: {spec.l2_cache_bytes}",
            f"  clock_rate_ghz: {spec.clock_ghz}",
            f"  device_memory_size: {info.hbm_bytes}",
            f"  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*spec.cudnn),
            f'device_description_str: "{spec.description}"',
        )
    )


def libtpu_available() -> bool:
    """Whether the ``libtpu`` wheel (the ``tpu`` extra) is installed."""
    return importlib.util.find_spec("libtpu") is not None


def cuda_plan_available() -> bool:
    """Whether JAX's CUDA plugin (the ``cuda-plan`` or ``cuda`` extra) is installed."""
    return importlib.util.find_spec("jax_cuda12_plugin") is not None


INSTALL_HINT = (
    "compiling for a TPU slice needs libtpu: `uv sync --extra tpu` (or `pip install "
    "'jax[tpu]==0.9.0.1'`), then run again."
)
CUDA_INSTALL_HINT = (
    "compiling for NVIDIA GPUs needs JAX's CUDA plugin: `uv sync --extra cuda-plan` (or `pip "
    "install jax-cuda12-plugin==0.9.0.1 nvidia-cuda-runtime-cu12`), then run again."
)


def install_hint(name: str) -> str | None:
    """What to install to compile for target ``name``, or None when it is installed."""
    if target(name).platform == Platform.CUDA:
        return None if cuda_plan_available() else CUDA_INSTALL_HINT
    return None if libtpu_available() else INSTALL_HINT


def target(name: str) -> Target:
    """The :class:`Target` called ``name``; ConfigError listing the known ones otherwise."""
    if name not in TARGETS:
        raise ConfigError(f"Unknown topology {name!r}; known: {', '.join(TARGETS)}.")
    return TARGETS[name]


def devices(name: str) -> list[Any]:
    """The compile-only devices of the TPU slice or GPU nodes ``name`` (all hosts), in the
    topology's order.

    Needs ``JAX_PLATFORMS=cpu`` (or no other backend of that platform in the process) and
    libtpu or the CUDA plugin.

    Raises:
      ConfigError: an unknown name.
      UserError: the platform's package is not installed (the message says how to install
        it), or the CUDA plugin did not register in this process.
    """
    t = target(name)
    if hint := install_hint(name):
        raise UserError(hint)
    from jax.experimental import topologies

    if t.platform == Platform.CUDA:
        # Without a GPU the plugin's start-up check of the CUDA libraries fails and the plugin
        # does not register; compiling needs none of them.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        try:
            desc = topologies.get_topology_desc(
                platform="cuda", target_config=gpu_target_config(t.chip_config),
                topology=t.topology,
            )  # fmt: skip
        except NotImplementedError as err:
            raise UserError(
                "JAX's CUDA plugin did not register in this process (JAX started before "
                "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 was set): set it in the environment and "
                "run again."
            ) from err
        return list(desc.devices)
    # libtpu asks the GCE metadata server where it runs unless told not to; a stale lock file
    # of an earlier process would stop it from loading.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=t.topology,
        chip_config_name=t.chip_config,
        chips_per_host_bounds=t.host_bounds,
        num_slices=1,
        wrap=(False, False, False),
    )
    return list(desc.devices)


# -- reading the compiled program -----------------------------------------------------------------

_ITEMSIZE = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
    "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
    "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_COLLECTIVES = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
    "ragged-all-to-all", "collective-broadcast",
)  # fmt: skip
# Instructions that move no HBM bytes of their own (views, control flow, bookkeeping).
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
}  # fmt: skip


class _Instr(NamedTuple):
    name: str
    shape: str  # the result shape text, e.g. "f32[8,16]{1,0}" or "(s32[], f32[4])"
    op: str
    operands: tuple[str, ...]
    args: str  # the text between the operation's parentheses
    attrs: str  # the text after them


def _split_shape(rest: str) -> tuple[str, str]:
    """``"(a, b) op(...)"`` or ``"f32[2]{0} op(...)"`` -> (shape, the rest)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """HLO text -> ({computation: instructions}, entry computation name)."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if (m := _HEADER.match(line)) and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None or not (m := _INSTR.match(line)):
            continue
        shape, rest = _split_shape(line[m.end() :])
        op, _, args = rest.partition("(")
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        operands = tuple(re.findall(r"%([\w.\-]+)", args[:end]))
        comps[current].append(
            _Instr(m.group(1), shape, op.strip(), operands, args[:end], args[end + 1 :])
        )
    return comps, entry


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


_LAYOUT_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\](\{[^}]*\})?")
_SLICING = ("slice", "dynamic-slice", "gather")
_VIEWS = ("ConcatBitcast", "AllocateBuffer")  # TPU custom calls that move no data


def _hbm_bytes(shape: str) -> int:
    """Bytes of the arrays of ``shape`` that live in HBM (a TPU layout's ``S(n)`` marks another
    memory space: on-chip vector or scalar memory)."""
    return sum(
        math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dt]
        for dt, dims, layout in _LAYOUT_ARRAY.findall(shape)
        if "S(" not in layout
    )


def _param_reads(comp: list[_Instr], index: int, full: int, comps: dict) -> int:
    """HBM bytes a fused computation reads of its parameter ``index`` (``full`` bytes): what
    its slices return when it is only sliced (through bitcasts and nested fusions too), else
    ``full``; 0 when it is only the buffer a dynamic-update-slice writes in place."""
    name = next((i.name for i in comp if i.op == "parameter" and i.args == str(index)), None)
    return full if name is None else _reads(comp, name, full, comps)


def _reads(comp: list[_Instr], name: str, full: int, comps: dict) -> int:
    """HBM bytes the users of value ``name`` (``full`` bytes) in ``comp`` read of it."""
    users = [i for i in comp if name in i.operands]
    if not users:
        return full
    total = 0
    for user in users:
        if user.op in _SLICING:
            total += _bytes(user.shape)
        elif user.op == "dynamic-update-slice" and user.operands[0] == name:
            continue  # written in place: not read
        elif user.op == "bitcast":  # the same bytes seen with another shape (GPU fusions)
            total += _reads(comp, user.name, full, comps)
        elif user.op == "fusion" and (called := re.search(r"calls=%([\w.\-]+)", user.attrs)):
            inner = comps.get(called.group(1), [])
            total += sum(
                _param_reads(inner, j, full, comps)
                for j, operand in enumerate(user.operands)
                if operand == name
            )
        else:
            return full
    return min(total, full)


def _fusion_writes(comp: list[_Instr], shape: str) -> int:
    """HBM bytes a fusion writes: its result, except that a dynamic-update-slice at its root
    writes only the update into its buffer (in place)."""
    root = next((i for i in reversed(comp) if i.name and i.op), None)
    by_name = {i.name: i for i in comp}
    if root is None:
        return _hbm_bytes(shape)
    parts = [by_name.get(o) for o in root.operands] if root.op == "tuple" else [root]
    if not any(p is not None and p.op == "dynamic-update-slice" for p in parts):
        return _hbm_bytes(shape)
    total = 0
    for p in parts:
        if p is None:
            continue
        if p.op == "dynamic-update-slice":
            update = by_name.get(p.operands[1])
            total += _bytes(update.shape) if update is not None else 0
        else:
            total += _hbm_bytes(p.shape)
    return total


def _traffic(instr: _Instr, shapes: dict[str, str], comps: dict[str, list[_Instr]]) -> int:
    """HBM bytes an unfused instruction reads and writes (approximately, as XLA's cost
    analysis: slices and gathers read what they return, not their whole operand; an in-place
    dynamic-update-slice writes its update)."""
    if instr.op in _NO_TRAFFIC or instr.op.endswith("-done"):
        return 0
    if instr.op == "custom-call" and any(v in instr.attrs for v in _VIEWS):
        return 0
    if instr.op.endswith("-start"):  # (operands, results..., context): the moved buffer
        arrays = _arrays(instr.shape)[1:] or _arrays(instr.shape)
        return max((math.prod(d) * _ITEMSIZE[t] for t, d in arrays), default=0)
    if instr.op in _SLICING:
        return _bytes(instr.shape) + _hbm_bytes(instr.shape)
    if instr.op == "dynamic-update-slice":
        return 2 * _bytes(shapes.get(instr.operands[1], ""))
    reads = [_hbm_bytes(shapes.get(o, "")) for o in instr.operands]
    called = re.search(r"calls=%([\w.\-]+)", instr.attrs)
    if instr.op == "fusion" and called:
        body = comps.get(called.group(1), [])
        reads = [_param_reads(body, j, full, comps) for j, full in enumerate(reads)]
        return _fusion_writes(body, instr.shape) + sum(reads)
    return _hbm_bytes(instr.shape) + sum(reads)


def _bytes(shape: str) -> int:
    return sum(math.prod(dims) * _ITEMSIZE[dt] for dt, dims in _arrays(shape))


def _trip_count(instr: _Instr, comps: dict[str, list[_Instr]]) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count``, or the bound its condition
    compares the counter with (``lax.scan`` / ``lax.map`` loops count up from 0, ``LT``)."""
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs):
        return int(m.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", instr.attrs)
    body = list(comps.get(cond.group(1), [])) if cond else []
    for i in list(body):  # a condition may compare inside a fusion
        body += [c for _, name in _CALLEE.findall(i.attrs) for c in comps.get(name, [])]
    consts = {
        i.name: int(i.args) for i in body if i.op == "constant" and re.fullmatch(r"\d+", i.args)
    }
    for i in body:
        if i.op == "compare" and "direction=LT" in i.attrs:
            bounds = [consts[o] for o in i.operands if o in consts]
            if bounds:
                return bounds[0]
    scalars = {
        v
        for i in body
        if i.op == "constant" and i.shape.startswith("s32[]")
        for v in [consts.get(i.name)]
        if v is not None
    }
    return scalars.pop() if len(scalars) == 1 else None


def _multipliers(comps: dict[str, list[_Instr]], entry: str) -> tuple[dict, dict, list]:
    """How often each computation runs per execution, which ones are fusion bodies (their
    instructions move no HBM bytes of their own), and loops of unknown trip count."""
    runs: dict[str, int] = {}
    fused: set[str] = set()
    unknown: list[str] = []

    def visit(name: str, times: int, in_fusion: bool) -> None:
        runs[name] = runs.get(name, 0) + times
        if in_fusion:
            fused.add(name)
        for instr in comps.get(name, []):
            trips = 1
            if instr.op == "while":
                trips = _trip_count(instr, comps)
                if trips is None:
                    unknown.append(instr.name)
                    trips = 1
            for kind, callee in _CALLEE.findall(instr.attrs):
                if kind == "to_apply" and instr.op != "call":
                    continue  # a reducer's scalar computation
                loop = trips if kind in ("body", "condition") else 1
                inner = in_fusion or instr.op == "fusion" or instr.op.endswith("-start")
                visit(callee, times * loop, inner)
            for group in _CALLEES.findall(instr.attrs):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    visit(callee, times, in_fusion or instr.op.startswith("async"))

    visit(entry, 1, False)
    return runs, fused, unknown


def _is_matmul(instr: _Instr) -> bool:
    """``dot`` / ``convolution``, or a cuBLAS GEMM (a GPU program's ``custom-call``)."""
    if instr.op == "custom-call":
        return '"__cublas$' in instr.attrs and '"gemm_backend_config"' in instr.attrs
    return instr.op in ("dot", "convolution")


def _matmul_flops(instr: _Instr, shapes: dict[str, str]) -> int:
    """2 x output elements x contracted size, for ``dot``, ``convolution`` and cuBLAS GEMMs."""
    out = math.prod(d for _, dims in _arrays(instr.shape)[:1] for d in dims)  # (result, workspace)
    if instr.op in ("dot", "custom-call"):
        lhs = _arrays(shapes.get(instr.operands[0], ""))
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs) or re.search(
            r'"lhs_contracting_dimensions":\[([\d",]*)\]', instr.attrs
        )
        if not lhs or not dims:
            return 0
        axes = [int(d.strip('"')) for d in dims.group(1).split(",") if d]
        return 2 * out * math.prod(lhs[0][1][a] for a in axes)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    kernel = _arrays(shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else []
    if not labels or not kernel:
        return 0
    # XLA writes a batched matmul as a convolution whose spatial dimensions are the batch
    # (windows over dilated inputs): only the kernel's input-feature dimensions are contracted.
    # (The project runs no true convolutions.)
    k = kernel[0][1]
    return 2 * out * math.prod(k[j] for j, c in enumerate(labels.group(2)) if c == "i")


class Collective(NamedTuple):
    """Collectives of one kind and result shape in a program."""

    kind: str  # "all-reduce", "all-gather", ...
    shape: str  # the result's dtypes and dimensions, e.g. "f32[1589248]"
    count: int  # executions per program run (loop bodies counted by their trip count)
    bytes: int  # result bytes of one execution

    @property
    def total_bytes(self) -> int:
        return self.count * self.bytes


class HloCosts(NamedTuple):
    """What one execution of a compiled program does per device (:func:`hlo_costs`)."""

    flops: int  # matmul FLOPs (dot / convolution), loop bodies x trip count
    hbm_bytes: int  # operand + result bytes of every unfused instruction and fusion
    collectives: tuple[Collective, ...]
    unknown_loops: tuple[str, ...]  # while loops whose trip count was not found (counted once)


def _shape_text(shape: str) -> str:
    """``f32[8,16]``, or for a tuple of more than two arrays ``f32: 25 arrays, 36,865 values``
    (XLA combines small collectives into one)."""
    arrays = _arrays(shape)
    if len(arrays) <= 2:
        return ",".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in arrays)
    dtypes = "/".join(sorted({dt for dt, _ in arrays}))
    values = sum(math.prod(dims) for _, dims in arrays)
    return f"{dtypes}: {len(arrays)} arrays, {values:,} values"


def hlo_costs(text: str) -> HloCosts:
    """FLOPs, HBM traffic and collectives of one execution of the program in HLO ``text``
    (``compiled.as_text()``), per device."""
    comps, entry = _parse(text)
    runs, fused, unknown = _multipliers(comps, entry)
    flops = hbm = 0
    found: dict[tuple[str, str], list[int]] = {}
    for name, instrs in comps.items():
        times = runs.get(name, 0)
        if not times:
            continue
        shapes = {i.name: i.shape for i in instrs}
        for instr in instrs:
            if _is_matmul(instr):
                flops += times * _matmul_flops(instr, shapes)
            kind = instr.op.removesuffix("-start")
            if kind in _COLLECTIVES:
                arrays = _arrays(instr.shape)
                if instr.op.endswith("-start") and len(arrays) > 1:  # (operands, result, ...)
                    dt, dims = max(arrays, key=lambda a: math.prod(a[1]) * _ITEMSIZE[a[0]])
                    shape = f"{dt}[{','.join(map(str, dims))}]"
                    size = math.prod(dims) * _ITEMSIZE[dt]
                else:
                    shape, size = _shape_text(instr.shape), _bytes(instr.shape)
                found.setdefault((kind, shape), [0, size])[0] += times
            if name not in fused:
                hbm += times * _traffic(instr, shapes, comps)
    colls = tuple(
        sorted(
            (Collective(k, s, c, b) for (k, s), (c, b) in found.items()),
            key=lambda c: -c.total_bytes,
        )
    )
    return HloCosts(flops, hbm, colls, tuple(unknown))


def collectives(text: str) -> tuple[Collective, ...]:
    """The collectives of the program in HLO ``text``, largest total bytes first."""
    return hlo_costs(text).collectives


class ProgramReport(NamedTuple):
    """Per device: memory of a compiled program and the costs of one execution."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int
    peak_bytes: int  # arguments + outputs - aliased + temporaries
    costs: HloCosts
    compile_seconds: float


def analyze(compiled: Any, compile_seconds: float = 0.0) -> ProgramReport:
    """Memory (XLA's analysis) and :func:`hlo_costs` of a ``jax.stages.Compiled``."""
    mem = compiled.memory_analysis()
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return ProgramReport(
        arg, out, alias, temp, arg + out - alias + temp, hlo_costs(compiled.as_text()),
        compile_seconds,
    )  # fmt: skip


def roofline(flops: float, hbm_bytes: float, chip: Chip) -> float:
    """Seconds of a program on ``chip`` bounded by its peak FLOP/s and HBM bandwidth:
    ``max(flops / peak, bytes / bandwidth)``. A lower bound: communication, latency and
    imperfect kernels are left out."""
    return max(flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth)


def total_bytes(colls: Iterable[Collective], kinds: Sequence[str] | None = None) -> int:
    """Bytes moved by ``colls`` per program run (of the given kinds, default all)."""
    return sum(c.total_bytes for c in colls if kinds is None or c.kind in kinds)
