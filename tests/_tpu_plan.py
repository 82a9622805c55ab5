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
from lora_jax import topologies  # noqa: E402

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
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), ranks=(8,), seeds=(13,),
        steps=20, eval_every=10, max_length=16, test_cap=100, dtype=dtype,
    )  # fmt: skip
    devices = topologies.devices(topology)
    mesh = sh.make_mesh({"data": len(devices)}, devices=devices)
    progs = plan_lib.plan_job(
        cfg, [jobs.Cell("mr", "lora", 8, 13)], plan_lib.encoder_shapes(cfg), 2, mesh,
        sh.rules_for_mesh(mesh), training=programs != "eval", evaluation=programs != "train",
    )  # fmt: skip
    adapter_values = TINY["num_hidden_layers"] * 2 * 2 * TINY["hidden_size"] * 8
    return {
        "processes": sorted({d.process_index for d in devices}),
        "device_kind": devices[0].device_kind,
        "adapter_bytes": 4 * adapter_values,
        "programs": [
            {
                "name": p.name,
                "steps": p.steps,
                "peak_bytes": p.report.peak_bytes,
                "argument_bytes": p.report.argument_bytes,
                "flops": p.report.costs.flops,
                "collectives": [c._asdict() for c in p.report.costs.collectives],
            }
            for p in progs
        ],
        "table": plan_lib.format_plan(topologies.TARGETS[topology], mesh, progs),
    }


def tiny_job(topology: str) -> dict:
    """The training program of a job of three LoRA cells (ranks 1, 2, 4) of the tiny encoder,
    its members split over the slice as a run on a mesh trains them."""
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), ranks=(1, 2, 4),
        seeds=(13,), steps=20, eval_every=10, max_length=16, test_cap=100,
    )  # fmt: skip
    devices = topologies.devices(topology)
    mesh = sh.make_mesh({"data": len(devices)}, devices=devices)
    job = [jobs.Cell("mr", "lora", r, 13) for r in (1, 2, 4)]
    (train,) = plan_lib.plan_job(
        cfg, job, plan_lib.encoder_shapes(cfg), 2, mesh, sh.rules_for_mesh(mesh), evaluation=False
    )
    return {
        "name": train.name,
        "peak_bytes": train.report.peak_bytes,
        "collectives": [c._asdict() for c in train.report.costs.collectives],
    }


def tiny_ntk(topology: str, kernel: str = "matched", mesh: str = "data") -> dict:
    """The eNTK programs of a LoRA cell's ``--ntk`` analysis (r=8, ``--ntk-kernel kernel``) of
    the tiny encoder, rows over ``data`` (and the parameters over ``fsdp`` with
    ``mesh="fsdp"``)."""
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), ranks=(8,), seeds=(13,),
        max_length=16, test_cap=100, ntk=True, ntk_kernel=kernel,
    )  # fmt: skip
    devices = topologies.devices(topology)
    axes = {"data": len(devices)} if mesh == "data" else {"data": len(devices) // 2, "fsdp": 2}
    mesh_ = sh.make_mesh(axes, devices=devices)
    cell = jobs.Cell("mr", "lora", 8, 13)
    progs = plan_lib.plan_kernels(cfg, cell, plan_lib.encoder_shapes(cfg), 2, mesh_)
    return {
        "programs": [
            {
                "name": p.name,
                "runs": p.runs,
                "peak_bytes": p.report.peak_bytes,
                "argument_bytes": p.report.argument_bytes,
                "flops": p.report.costs.flops,
                "collectives": [c._asdict() for c in p.report.costs.collectives],
            }
            for p in progs
        ],
        "table": plan_lib.format_plan(topologies.TARGETS[topology], mesh_, progs),
    }


CASES = {
    "matmul_loop": matmul_loop,
    "tiny_plan": tiny_plan,
    "tiny_job": tiny_job,
    "tiny_ntk": tiny_ntk,
}

if __name__ == "__main__":
    # Each argument is CASE[:ARG[:ARG]]; one process runs them all (libtpu loads once).
    out = {}
    for spec in sys.argv[1:]:
        case, *args = spec.split(":")
        out[spec] = CASES[case](*args)
    print(json.dumps(out))
