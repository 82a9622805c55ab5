"""Data-parallel LoRA reduces the adapters' gradients once per step, in float32.

Read from the compiled TPU program (libtpu's compile-only devices, in a subprocess of its own:
tests/_tpu_grad_reduce.py) of an encoder deep enough for the layer scan, whose backward pass
would otherwise all-reduce each layer's gradients as it yields them.
"""

import json
import os
import subprocess
import sys

import pytest

from lora_jax import topologies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not topologies.libtpu_available(),
    reason="libtpu is not installed (uv sync --extra tpu, or the dev group)",
)


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.update(TPU_WORKER_HOSTNAMES="localhost", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_tpu_grad_reduce.py"), "bfloat16"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_float32_gradient_all_reduce_per_step(compiled):
    """Under the layer scan, on two hosts, in bfloat16: the only collective of adapter size is
    one float32
    all-reduce per step of all the adapters' gradients (plus the loss); no other collective
    moves floats (the others gather the batch's token rows)."""
    got = compiled["bfloat16"]
    assert got["processes"] == [0, 1]
    adapter, steps = got["adapter_bytes"], got["steps"]
    floats = [c for c in got["collectives"] if not c["shape"].startswith(("s32", "u32", "pred"))]
    assert len(floats) == 1, got["collectives"]
    (grad,) = floats
    assert grad["kind"] == "all-reduce" and grad["count"] == steps, grad
    assert grad["shape"].startswith("f32"), grad  # one all-reduce of every leaf, float32
    assert adapter <= grad["bytes"] <= adapter + 64, grad  # the gradients and the loss
    # the rest gather the batch's token rows: no collective but the one of adapter size
    assert all(c["bytes"] < adapter / 2 for c in got["collectives"] if c is not grad)
