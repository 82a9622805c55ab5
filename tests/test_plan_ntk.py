"""``experiments.plan --ntk`` plans a cell's linearized model's training
(``experiments.plan.plan_linearized``), compiled for two TPU hosts (v4-16: 8 chips) in a
subprocess with libtpu (tests/_tpu_plan_ntk.py; the encoder of tests/_tpu_plan.py)."""

import json
import os
import subprocess
import sys

import pytest

from lora_jax import topologies

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def planned() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.update(TPU_WORKER_HOSTNAMES="localhost", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_tpu_plan_ntk.py"), "v4-16"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not topologies.libtpu_available(),
    reason="libtpu is not installed (uv sync --extra tpu, or the dev group)",
)
def test_linearized_training_compiles_for_two_hosts(planned):
    """The linearized LoRA model of a cell (r = 8 on query / value, 20 steps, dev every 10)
    trains as ``train.fit`` runs it on the slice, data parallel: its chunk and dev programs fit
    a v4 chip; each step all-reduces its gradients once in float32 (the adapters', no more),
    and costs more FLOPs than the LoRA cell's own step, since the JVP over the base weights
    adds a tangent pass beside the forward pass."""
    assert planned["processes"] == [0, 1]
    train, dev = planned["linearized"]
    assert (train["name"], train["steps"], train["runs"]) == (
        "train linearized r=8 x1 (10 steps)", 10, 2,
    )  # fmt: skip
    assert (dev["name"], dev["runs"]) == (f"dev linearized r=8 x1 ({planned['dev_rows']} rows)", 2)
    for p in (train, dev):
        assert 0 < p["argument_bytes"] <= p["peak_bytes"] < topologies.CHIPS["v4"].hbm_bytes
        assert p["flops"] > 0
    large = [c for c in train["collectives"] if c["bytes"] >= planned["adapter_bytes"]]
    assert len(large) == 1, train["collectives"]
    (grad,) = large
    assert grad["kind"] == "all-reduce" and grad["count"] == 10 and grad["shape"].startswith("f32")
    # The tangent runs through the factors ((x A) B), so no dense (in, out) gradient of an adapted
    # kernel is formed: the step all-reduces the adapters' gradients and the loss, nothing larger.
    assert all(c["bytes"] <= planned["adapter_bytes"] + 16 for c in train["collectives"]), train
    assert train["flops"] > 1.5 * planned["lora_train"]["flops"]
    assert "| train linearized r=8 x1 (10 steps) |" in planned["table"]
