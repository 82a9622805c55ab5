"""Subprocess body of tests/test_plan.py: compiles programs for compile-only TPU and GPU devices.

Run as ``python tests/_tpu_plan.py CASE[:ARG...] ...`` with ``JAX_PLATFORMS=cpu`` and libtpu
(TPU topologies) or JAX's CUDA plugin (``h100-*`` / ``a100-*``) installed (a process of its own:
libtpu loads once per process, and the test process runs on simulated CPU devices); prints one
JSON object.
"""

import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments import jobs  # noqa: E402
from experiments import plan as plan_lib  # noqa: E402
from experiments.config import get_config  # noqa: E402
from lora_jax import sharding as sh  # noqa: E402
from lora_jax import tasks, topologies  # noqa: E402

TINY = {  # a 2-layer, hidden-64 RoBERTa config.json
    "model_type": "roberta",
    "vocab_size": 96,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 40,
    "type_vocab_size": 1,
    "pad_token_id": 1,
}
# f32 LoRA factors of r = 8 on query and value: A [64, 8] and B [8, 64] per matrix and layer.
ADAPTER_BYTES = 4 * TINY["num_hidden_layers"] * 2 * 2 * TINY["hidden_size"] * 8


def _tiny_config(**overrides):
    """The experiment config of a run of the tiny encoder (its config.json in a temp dir)."""
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY, f)
    fields = dict(tasks=("mr",), methods=("lora",), seeds=(13,), max_length=16, test_cap=100)
    return get_config("default", model=directory, **{**fields, **overrides})


def _data_mesh(topology: str):
    devices = topologies.devices(topology)
    return devices, sh.make_mesh({"data": len(devices)}, devices=devices)


def _program(p) -> dict:
    """One planned program's figures (an ``experiments.plan.Program``)."""
    return {
        "name": p.name,
        "steps": p.steps,
        "runs": p.runs,
        "peak_bytes": p.report.peak_bytes,
        "argument_bytes": p.report.argument_bytes,
        "flops": p.report.costs.flops,
        "collectives": [c._asdict() for c in p.report.costs.collectives],
    }


def matmul_loop(topology: str, gemm: str = "default") -> dict:
    """A 5-step scan of ``x @ w`` with a gradient step: its FLOPs and collectives per device
    (``gemm="cublas"``: a GPU program's matmuls as cuBLAS calls, not XLA's Triton kernels)."""
    devices = topologies.devices(topology)
    mesh = sh.make_mesh({"data": len(devices)}, devices=devices)
    m, k, n = 16 * len(devices), 256, 128

    def f(w, x):
        def body(w, _):
            g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)  # (k, n), summed over rows
            return w - 0.1 * g, None

        return jax.lax.scan(body, w, None, length=5)[0]

    w = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    options = {"xla_gpu_enable_triton_gemm": False} if gemm == "cublas" else None
    compiled = jax.jit(f).lower(w, x).compile(compiler_options=options)
    costs = topologies.analyze(compiled).costs
    return {
        "devices": len(devices),
        "cublas_calls": compiled.as_text().count('custom_call_target="__cublas$gemm"'),
        "processes": sorted({d.process_index for d in devices}),
        "rows_per_device": m // len(devices),
        "k": k,
        "n": n,
        "flops": costs.flops,
        "collectives": [c._asdict() for c in costs.collectives],
        "unknown_loops": list(costs.unknown_loops),
    }


def tiny_plan(topology: str, dtype: str, programs: str = "all") -> dict:
    """The programs of a one-cell LoRA run of the tiny encoder (r=8 on query/value)."""
    cfg = _tiny_config(ranks=(8,), steps=20, eval_every=10, dtype=dtype)
    devices, mesh = _data_mesh(topology)
    progs = plan_lib.plan_job(
        cfg, [jobs.Cell("mr", "lora", 8, 13)], plan_lib.encoder_shapes(cfg), 2, mesh,
        sh.rules_for_mesh(mesh), training=programs != "eval", evaluation=programs != "train",
    )  # fmt: skip
    return {
        "processes": sorted({d.process_index for d in devices}),
        "device_kind": devices[0].device_kind,
        "adapter_bytes": ADAPTER_BYTES,
        "programs": [_program(p) for p in progs],
        "table": plan_lib.format_plan(topologies.TARGETS[topology], mesh, progs),
    }


def tiny_job(topology: str) -> dict:
    """The training program of a job of three LoRA cells (ranks 1, 2, 4) of the tiny encoder,
    its members split over the slice as a run on a mesh trains them."""
    cfg = _tiny_config(ranks=(1, 2, 4), steps=20, eval_every=10)
    _, mesh = _data_mesh(topology)
    job = [jobs.Cell("mr", "lora", r, 13) for r in (1, 2, 4)]
    (train,) = plan_lib.plan_job(
        cfg, job, plan_lib.encoder_shapes(cfg), 2, mesh, sh.rules_for_mesh(mesh), evaluation=False
    )
    return _program(train)


def tiny_ntk(topology: str, kernel: str = "matched", mesh: str = "data") -> dict:
    """The eNTK programs of a LoRA cell's ``--ntk`` analysis (r=8, ``--ntk-kernel kernel``) of
    the tiny encoder, rows over ``data`` (and the parameters over ``fsdp`` with
    ``mesh="fsdp"``)."""
    cfg = _tiny_config(ranks=(8,), ntk=True, ntk_kernel=kernel)
    devices = topologies.devices(topology)
    axes = {"data": len(devices)} if mesh == "data" else {"data": len(devices) // 2, "fsdp": 2}
    mesh_ = sh.make_mesh(axes, devices=devices)
    cell = jobs.Cell("mr", "lora", 8, 13)
    progs = plan_lib.plan_kernels(cfg, cell, plan_lib.encoder_shapes(cfg), 2, mesh_)
    return {
        "programs": [_program(p) for p in progs],
        "table": plan_lib.format_plan(topologies.TARGETS[topology], mesh_, progs),
    }


def tiny_linearized(topology: str) -> dict:
    """The linearized model's training of a LoRA cell's ``--ntk`` analysis (r=8, 20 steps, dev
    every 10; ``experiments.plan.plan_linearized``), data parallel, and for comparison the
    cell's own training program."""
    cfg = _tiny_config(ranks=(8,), steps=20, eval_every=10, ntk=True)
    devices, mesh = _data_mesh(topology)
    rules = sh.rules_for_mesh(mesh)
    encoder, cell = plan_lib.encoder_shapes(cfg), jobs.Cell("mr", "lora", 8, 13)
    linearized = plan_lib.plan_linearized(cfg, cell, encoder, 2, mesh, rules)
    (lora_train,) = plan_lib.plan_job(cfg, [cell], encoder, 2, mesh, rules, evaluation=False)
    return {
        "processes": sorted({d.process_index for d in devices}),
        "adapter_bytes": ADAPTER_BYTES,
        "dev_rows": cfg.k * 2,
        "linearized": [_program(p) for p in linearized],
        "lora_train": _program(lora_train),
        "table": plan_lib.format_plan(topologies.TARGETS[topology], mesh, linearized),
    }


def tiny_all_weights(topology: str) -> dict:
    """The all-weights eNTK of the tiny encoder with a 2,047-row word table (``experiments.plan
    --all-weights-kernel``), on a ``data x fsdp=2`` mesh: the table compacted for 300 distinct
    ids (512 rows kept) and dense (2,047 distinct ids: all rows, an odd count, so fsdp splits
    the table's 64 columns); and the Gram slicing the kernel picks for TPU meshes."""
    from ntk import _jacobians

    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**TINY, "vocab_size": 2047}, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), seeds=(13,), ranks=(8,),
        max_length=16, test_cap=100, ntk_kernel="sgd",
    )  # fmt: skip
    devices = topologies.devices(topology)
    mesh = sh.make_mesh({"data": len(devices) // 2, "fsdp": 2}, devices=devices)
    cell, encoder = jobs.Cell("mr", "lora", 8, 13), plan_lib.encoder_shapes(cfg)
    named = tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=cfg.k)
    text, compacted = plan_lib.plan_all_weights(
        cfg, [cell], named, encoder, mesh, topologies.TARGETS[topology], 300
    )
    dense = plan_lib.plan_kernels(
        cfg, cell, encoder, 2, mesh, all_weights=True, distinct_tokens=2047
    )
    out = {"compacted": [_program(p) for p in compacted], "dense": [_program(p) for p in dense]}
    out["text"] = text
    out["gram_chunk"] = {
        "fsdp": _jacobians.layout(mesh, "data", "fsdp").chunk,
        "data": _jacobians.layout(_data_mesh(topology)[1], "data", None).chunk,
    }
    return out


# A 3-layer, hidden-32 RoBERTa config.json, its first two layers under the layer scan (as a
# 24-layer encoder's 23: encoder.SCAN_MIN_LAYERS lowered while it compiles), so its backward
# pass yields the adapters' gradients layer by layer.
DEEP = {**TINY, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
DEEP_RANK = 4


def deep_train(topology: str, dtype: str) -> dict:
    """The collectives of the data-parallel training program of a one-cell LoRA run (r=4 on
    query / value) of the 3-layer encoder, its layers under the scan."""
    from lora_jax.models import encoder

    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(DEEP, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), ranks=(DEEP_RANK,),
        seeds=(13,), steps=4, eval_every=4, max_length=16, dtype=dtype,
    )  # fmt: skip
    devices, mesh = _data_mesh(topology)
    scan_min, encoder.SCAN_MIN_LAYERS = encoder.SCAN_MIN_LAYERS, 3
    try:
        (train,) = plan_lib.plan_job(
            cfg, [jobs.Cell("mr", "lora", DEEP_RANK, 13)], plan_lib.encoder_shapes(cfg), 2,
            mesh, sh.rules_for_mesh(mesh), evaluation=False,
        )  # fmt: skip
    finally:
        encoder.SCAN_MIN_LAYERS = scan_min
    # query and value of every layer: A (hidden, r) and B (r, hidden), float32
    adapter_values = DEEP["num_hidden_layers"] * 2 * 2 * DEEP["hidden_size"] * DEEP_RANK
    return {
        "steps": train.steps,
        "processes": sorted({d.process_index for d in devices}),
        "adapter_bytes": 4 * adapter_values,
        "collectives": [c._asdict() for c in train.report.costs.collectives],
    }


CASES = {
    "matmul_loop": matmul_loop,
    "tiny_plan": tiny_plan,
    "tiny_job": tiny_job,
    "tiny_ntk": tiny_ntk,
    "tiny_all_weights": tiny_all_weights,
    "tiny_linearized": tiny_linearized,
    "deep_train": deep_train,
}

if __name__ == "__main__":
    # Each argument is CASE[:ARG[:ARG]]; one process runs them all (libtpu loads once).
    out = {}
    for spec in sys.argv[1:]:
        case, *args = spec.split(":")
        out[spec] = CASES[case](*args)
    print(json.dumps(out))
