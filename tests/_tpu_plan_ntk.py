"""Subprocess body of tests/test_plan_ntk.py: the linearized model's training of an ``--ntk``
cell compiled for compile-only TPU devices.

Run as ``python tests/_tpu_plan_ntk.py TOPOLOGY`` with ``JAX_PLATFORMS=cpu`` and libtpu installed
(a process of its own: libtpu loads once per process); prints one JSON object: the programs of
``experiments.plan.plan_linearized`` and, for comparison, the LoRA cell's own training program,
for tests/_tpu_plan.py's tiny encoder.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from _tpu_plan import TINY  # noqa: E402  (sets jax_platforms=cpu before jax starts)

from experiments import jobs  # noqa: E402
from experiments import plan as plan_lib  # noqa: E402
from experiments.config import get_config  # noqa: E402
from lora_jax import sharding as sh  # noqa: E402
from lora_jax import topologies  # noqa: E402


def report(p) -> dict:
    return {
        "name": p.name,
        "steps": p.steps,
        "runs": p.runs,
        "peak_bytes": p.report.peak_bytes,
        "argument_bytes": p.report.argument_bytes,
        "flops": p.report.costs.flops,
        "collectives": [c._asdict() for c in p.report.costs.collectives],
    }


def main(topology: str) -> dict:
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), ranks=(8,), seeds=(13,),
        steps=20, eval_every=10, max_length=16, test_cap=100, ntk=True,
    )  # fmt: skip
    devices = topologies.devices(topology)
    mesh = sh.make_mesh({"data": len(devices)}, devices=devices)
    rules = sh.rules_for_mesh(mesh)
    encoder, cell = plan_lib.encoder_shapes(cfg), jobs.Cell("mr", "lora", 8, 13)
    linearized = plan_lib.plan_linearized(cfg, cell, encoder, 2, mesh, rules)
    (lora_train,) = plan_lib.plan_job(cfg, [cell], encoder, 2, mesh, rules, evaluation=False)
    return {
        "processes": sorted({d.process_index for d in devices}),
        "adapter_bytes": 4 * TINY["num_hidden_layers"] * 2 * 2 * TINY["hidden_size"] * 8,
        "dev_rows": cfg.k * 2,
        "linearized": [report(p) for p in linearized],
        "lora_train": report(lora_train),
        "table": plan_lib.format_plan(topologies.TARGETS[topology], mesh, linearized),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
