"""Subprocess body of tests/test_gradient_reduce.py: the collectives of a deep tiny encoder's
data-parallel LoRA training program, compiled for a two-host TPU slice (v4-16).

Run as ``python tests/_tpu_grad_reduce.py DTYPE ...`` with ``JAX_PLATFORMS=cpu`` and libtpu
installed (libtpu loads once per process); prints one JSON object, per dtype.
"""

import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_platforms", "cpu")

from experiments import jobs  # noqa: E402
from experiments import plan as plan_lib  # noqa: E402
from experiments.config import get_config  # noqa: E402
from lora_jax import sharding as sh  # noqa: E402
from lora_jax import topologies  # noqa: E402
from lora_jax.models import encoder  # noqa: E402

# A 3-layer, hidden-32 RoBERTa config.json, its first two layers under the layer scan (as a
# 24-layer encoder's 23: encoder.SCAN_MIN_LAYERS lowered to compile in seconds), so its
# backward pass yields the adapters' gradients layer by layer.
encoder.SCAN_MIN_LAYERS = 3
DEEP = {
    "model_type": "roberta",
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "type_vocab_size": 1,
    "pad_token_id": 1,
}
RANK = 4


def deep_train(dtype: str) -> dict:
    """The collectives of the training program of a one-cell LoRA run (r=4 on query / value)."""
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(DEEP, f)
    cfg = get_config(
        "default", model=directory, tasks=("mr",), methods=("lora",), ranks=(RANK,),
        seeds=(13,), steps=4, eval_every=4, max_length=16, dtype=dtype,
    )  # fmt: skip
    devices = topologies.devices("v4-16")
    mesh = sh.make_mesh({"data": len(devices)}, devices=devices)
    (train,) = plan_lib.plan_job(
        cfg, [jobs.Cell("mr", "lora", RANK, 13)], plan_lib.encoder_shapes(cfg), 2, mesh,
        sh.rules_for_mesh(mesh), evaluation=False,
    )  # fmt: skip
    # query and value of every layer: A (hidden, r) and B (r, hidden), float32
    adapter_values = DEEP["num_hidden_layers"] * 2 * 2 * DEEP["hidden_size"] * RANK
    return {
        "steps": train.steps,
        "processes": sorted({d.process_index for d in devices}),
        "adapter_bytes": 4 * adapter_values,
        "collectives": [c._asdict() for c in train.report.costs.collectives],
    }


if __name__ == "__main__":
    print(json.dumps({dtype: deep_train(dtype) for dtype in sys.argv[1:]}))
