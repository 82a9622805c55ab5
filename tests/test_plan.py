"""Compile-only planning for TPU slices and GPU nodes (lora_jax.topologies, experiments.plan).

The compiled-program tests need libtpu (the ``tpu`` extra) or JAX's CUDA plugin (the
``cuda-plan`` extra; the dev group installs both) and run in one subprocess of their own
(tests/_tpu_plan.py): libtpu loads once per process, and this process runs on simulated CPU
devices.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lora_jax import topologies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    not topologies.libtpu_available(),
    reason="libtpu is not installed (uv sync --extra tpu, or the dev group)",
)
needs_cuda_plugin = pytest.mark.skipif(
    not topologies.cuda_plan_available(),
    reason="JAX's CUDA plugin is not installed (uv sync --extra cuda-plan, or the dev group)",
)


TINY_LAYERS, TINY_HIDDEN = 2, 64  # tests/_tpu_plan.py's tiny encoder

TPU_CASES = (
    "matmul_loop:v4-16",
    "tiny_plan:v4-16:float32",
    "tiny_plan:v4-16:bfloat16:train",
    "tiny_plan:v4-8:float32:eval",
    "tiny_job:v4-16",
    "tiny_ntk:v4-16:asigngd",
    "tiny_all_weights:v4-16",
    "tiny_linearized:v4-16",
    "deep_train:v4-16:bfloat16",
)
# A GPU program compiles slower than a TPU one (XLA's GPU passes, then PTX): one of each kind.
GPU_CASES = ("matmul_loop:h100-16", "matmul_loop:h100-8:cublas", "tiny_plan:h100-8:bfloat16:train")


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Every compiled case of this file whose platform is installed, from one subprocess."""
    cases = TPU_CASES * topologies.libtpu_available()
    cases += GPU_CASES * topologies.cuda_plan_available()
    return _run(*cases)


def _run(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.update(TPU_WORKER_HOSTNAMES="localhost", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_tpu_plan.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_targets_are_the_cloud_slices():
    # Cloud names count TensorCores for v4 / v5p (two per chip), chips for v5e; 4 chips a host
    # except v5e-8 (one host of 8).
    got = {n: (t.chips, t.hosts) for n, t in topologies.TARGETS.items()}
    assert got == {
        "v4-8": (4, 1), "v4-16": (8, 2), "v4-32": (16, 4), "v4-64": (32, 8), "v5e-8": (8, 1),
        "v5e-16": (16, 4), "v5e-32": (32, 8), "v5p-8": (4, 1), "v5p-16": (8, 2),
        "h100-8": (8, 1), "h100-16": (16, 2), "a100-8": (8, 1), "a100-16": (16, 2),
    }  # fmt: skip


def test_roofline_is_the_slower_of_compute_and_memory():
    chip = topologies.CHIPS["v5e"]
    assert topologies.roofline(197e12, 0, chip) == pytest.approx(1.0)
    assert topologies.roofline(0, 819e9, chip) == pytest.approx(1.0)
    assert topologies.roofline(197e12, 2 * 819e9, chip) == pytest.approx(2.0)


def test_plan_without_libtpu_says_how_to_install_it(monkeypatch):
    from experiments import plan

    monkeypatch.setattr(topologies, "libtpu_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--topology", "v4-16"])
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "uv sync --extra tpu" in message


def test_plan_without_the_cuda_plugin_says_how_to_install_it(monkeypatch):
    from experiments import plan

    monkeypatch.setattr(topologies, "cuda_plan_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--topology", "h100-8"])
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "uv sync --extra cuda-plan" in message


def test_plan_refuses_distinct_tokens_below_one_or_without_the_kernel(capsys):
    from experiments import plan

    with pytest.raises(SystemExit):
        plan.main(["--topology", "v4-16", "--all-weights-kernel", "--distinct-tokens", "0"])
    err = capsys.readouterr().err
    assert "--distinct-tokens must be a positive count of token ids; got 0." in err
    with pytest.raises(SystemExit):
        plan.main(["--topology", "v4-16", "--distinct-tokens", "5000"])
    assert "add --all-weights-kernel." in capsys.readouterr().err


def test_unknown_topology_is_one_line():
    with pytest.raises(topologies.ConfigError, match="Unknown topology 'v9-8'; known: v4-8"):
        topologies.target("v9-8")


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("matmul_loop:v4-16", marks=needs_libtpu),
        pytest.param("matmul_loop:h100-16", marks=needs_cuda_plugin),
        pytest.param("matmul_loop:h100-8:cublas", marks=needs_cuda_plugin),
    ],
)
def test_loop_flops_and_collectives_count_every_trip(compiled, case):
    """A 5-step scan of a data-parallel gradient step on v4-16 (8 chips, 2 hosts), two nodes of
    8 H100s, and one node with the matmuls as cuBLAS calls: FLOPs and the gradient all-reduce
    are counted 5 times (closed forms), not once as XLA's cost analysis."""
    got = compiled[case]
    target = topologies.TARGETS[case.split(":")[1]]
    assert got["devices"] == target.chips
    assert got["processes"] == list(range(target.hosts))
    assert (got["cublas_calls"] > 0) == case.endswith("cublas")  # GEMMs as cuBLAS calls
    m, k, n = got["rows_per_device"], got["k"], got["n"]
    # Per step: forward x @ w and the gradient x^T @ dy, 2 m k n FLOPs each.
    assert got["flops"] == 5 * 2 * (2 * m * k * n)
    assert got["unknown_loops"] == []
    (reduce,) = [c for c in got["collectives"] if c["bytes"] >= 4 * k * n]
    assert (reduce["kind"], reduce["count"], reduce["bytes"]) == ("all-reduce", 5, 4 * k * n)


def _check_gradient_reduce(got: dict) -> None:
    """In data-parallel LoRA the only collective of adapter size is one float32 all-reduce of
    the adapters' gradients per step."""
    train = got["programs"][0]
    adapter = got["adapter_bytes"]
    large = [c for c in train["collectives"] if c["bytes"] >= adapter // 2]
    assert len(large) == 1, large
    (grad,) = large
    assert grad["kind"] == "all-reduce" and grad["count"] == train["steps"]
    assert grad["shape"].startswith("f32"), grad  # reduced in float32 under bfloat16 too
    assert adapter <= grad["bytes"] <= adapter + 64  # the adapters' gradients (+ scalars)


@needs_libtpu
def test_tiny_encoder_programs_compile_for_two_hosts(compiled):
    """A LoRA run of a tiny encoder on v4-16 (8 chips, 2 hosts), data parallel: training,
    dev and test programs compile; memory and collectives are reported."""
    got = compiled["tiny_plan:v4-16:float32"]
    assert got["processes"] == [0, 1]
    train, dev, test = got["programs"]
    assert train["name"] == "train lora r=8 x1 (10 steps)" and train["steps"] == 10
    assert dev["name"].startswith("dev") and test["name"].startswith("test")
    for p in got["programs"]:
        assert 0 < p["argument_bytes"] <= p["peak_bytes"] < topologies.CHIPS["v4"].hbm_bytes
        assert p["flops"] > 0
    _check_gradient_reduce(got)
    assert "| train lora r=8 x1 (10 steps) |" in got["table"]


@needs_libtpu
def test_bfloat16_adapter_gradients_are_reduced_in_float32(compiled):
    _check_gradient_reduce(compiled["tiny_plan:v4-16:bfloat16:train"])


@needs_cuda_plugin
def test_tiny_encoder_trains_on_eight_h100s(compiled):
    """The tiny encoder's bf16 LoRA training program compiles for one 8-GPU H100 node, data
    parallel: its memory fits, and the adapters' gradients are all-reduced once per step in
    float32, the only collective of adapter size."""
    got = compiled["tiny_plan:h100-8:bfloat16:train"]
    assert got["device_kind"] == "NVIDIA H100 80GB HBM3" and got["processes"] == [0]
    (train,) = got["programs"]
    assert train["name"] == "train lora r=8 x1 (10 steps)"
    assert 0 < train["argument_bytes"] <= train["peak_bytes"] < topologies.CHIPS["h100"].hbm_bytes
    assert train["flops"] > 0
    _check_gradient_reduce(got)
    assert got["table"].startswith("h100-8: 8 x NVIDIA H100 SXM (1 host")


@needs_libtpu
def test_evaluation_is_split_over_the_devices_not_replicated(compiled):
    """The test set's forward FLOPs per device halve from 4 to 8 devices (a replicated
    evaluation would run every row on every device: the same FLOPs on both)."""
    four = {p["name"]: p for p in compiled["tiny_plan:v4-8:float32:eval"]["programs"]}
    eight = {p["name"]: p for p in compiled["tiny_plan:v4-16:float32"]["programs"]}
    name = "test lora r=8 x1 (100 rows)"
    # 100 rows in blocks padded to a multiple of the devices: 100 -> 100 (4) or 104 (8) rows.
    assert four[name]["flops"] / eight[name]["flops"] == pytest.approx(2 * 100 / 104, rel=0.05)


@needs_libtpu
def test_a_job_of_three_cells_fills_the_slice_and_moves_no_adapters(compiled):
    """Three cells on v4-16's 8 chips run as 8 members (5 idle copies), one per chip; what
    crosses chips is per-member scalars (the losses), never an adapter or its gradient."""
    got = compiled["tiny_job:v4-16"]
    assert got["name"] == "train lora x3 in 8 slots (10 steps)"
    assert 0 < got["peak_bytes"] < topologies.CHIPS["v4"].hbm_bytes
    rank_one_adapter = TINY_LAYERS * 2 * 2 * TINY_HIDDEN * 1 * 4  # bytes of the r = 1 factors
    assert all(c["bytes"] < rank_one_adapter for c in got["collectives"]), got["collectives"]


@needs_libtpu
def test_ntk_kernels_compile_for_two_hosts(compiled):
    """``--ntk --ntk-kernel asigngd`` of a LoRA cell on v4-16 (8 chips, 2 hosts): the programs
    its kernels run, as blocked for the slice (ntk.planning): K([train; test], train) from the
    train rows' kept Jacobians and the 132 rows in blocks of 128 (2 runs), and K(train, train)
    at the trained adapters in one program; each fits and reports FLOPs."""
    got = compiled["tiny_ntk:v4-16:asigngd"]
    names = [(p["name"], p["runs"]) for p in got["programs"]]
    both = "ntk asigngd K([train; test] 132 x train 32)"
    assert names == [
        (f"{both}: jacobian x2 (32 rows)", 1),
        (f"{both}: cross x1 (128 rows) x 1 kept", 2),
        ("ntk asigngd K(train 32 x train 32): pair (32 + 32 rows)", 1),
    ]
    for p in got["programs"]:
        assert 0 < p["argument_bytes"] <= p["peak_bytes"] < topologies.CHIPS["v4"].hbm_bytes
        assert p["flops"] > 0
    assert f"| {both}: cross x1 (128 rows) x 1 kept |" in got["table"]


@needs_libtpu
def test_all_weights_kernel_compiles_compacted_on_fsdp(compiled):
    """``--all-weights-kernel`` on v4-16 split ``data=4, fsdp=2``: the kernel over every weight
    of the tiny encoder (word table of 2,047 rows) compiles with the kept train Jacobians and
    the 132 rows in blocks of 128. Compacted to 512 rows (300 distinct ids), the kept Jacobians
    and the cross program's arguments and FLOPs are smaller than with the dense table. On TPU
    meshes, and wherever the weights split over fsdp, each Gram product is one matrix product
    (no column slices, which gather a split matrix at every slice), and the Jacobians keep
    their columns split over fsdp."""
    got = compiled["tiny_all_weights:v4-16"]
    assert "tables compacted for 300 distinct ids (--distinct-tokens): word_embeddings 512 of" \
        " 2,047 rows, position_embeddings 18 of 40 rows" in got["text"]  # fmt: skip
    both = "ntk sgd all weights K([train; test] 132 x train 32)"
    for planned in (got["compacted"], got["dense"]):
        assert [(p["name"], p["runs"]) for p in planned] == [
            (f"{both}: jacobian x2 (32 rows)", 1),
            (f"{both}: cross x1 (128 rows) x 1 kept", 2),
        ]
        for p in planned:
            assert 0 < p["argument_bytes"] <= p["peak_bytes"] < topologies.CHIPS["v4"].hbm_bytes
    (jac_c, cross_c), (jac_d, cross_d) = got["compacted"], got["dense"]
    assert cross_c["argument_bytes"] < cross_d["argument_bytes"]
    assert cross_c["flops"] < cross_d["flops"] and jac_c["peak_bytes"] < jac_d["peak_bytes"]
    assert got["gram_chunk"] == {"fsdp": None, "data": None}
    # The Jacobians stay split like the weights (ntk._jacobians.Layout): no collective of the
    # jacobian program moves a device's 8 rows of the word table's per-example gradients
    # (8 x 512 x 64 f32, 1 MiB, compacted; left to XLA, they were all-gathered whole), nor of
    # the dense table, whose odd row count puts the split on its columns (8 x 2,047 x 64).
    assert max(c["bytes"] for c in jac_c["collectives"]) < 8 * 512 * 64 * 4
    assert max(c["bytes"] for c in jac_d["collectives"]) < 8 * 2047 * 64 * 4


def test_gram_slices_on_cpu_weights_not_split():
    """The Gram products run in column slices (fast on XLA:CPU) on CPU devices whose weights
    are not split over an fsdp axis of more than one device (``tests/test_ntk_mesh.py``: not
    with fsdp=2; the test above: not on TPU)."""
    from ntk import _jacobians

    devices = jax.devices()[:1]
    one = jax.sharding.Mesh(np.array(devices).reshape(1, 1), ("data", "fsdp"))
    assert _jacobians.layout(None) == (_jacobians.GRAM_CHUNK, None, 1)  # one device: XLA places
    assert _jacobians.layout(one, "data", None).chunk == _jacobians.GRAM_CHUNK
    assert _jacobians.layout(one, "data", "fsdp").chunk == _jacobians.GRAM_CHUNK  # fsdp of 1


@needs_libtpu
def test_linearized_training_compiles_for_two_hosts(compiled):
    """The linearized LoRA model of a cell (r = 8 on query / value, 20 steps, dev every 10)
    trains as ``train.fit`` runs it on the slice, data parallel: its chunk and dev programs fit
    a v4 chip; each step all-reduces its gradients once in float32 (the adapters', no more),
    and costs more FLOPs than the LoRA cell's own step, since the JVP over the base weights
    adds a tangent pass beside the forward pass."""
    planned = compiled["tiny_linearized:v4-16"]
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


@needs_libtpu
def test_one_float32_gradient_all_reduce_per_step(compiled):
    """Data-parallel LoRA under the layer scan (whose backward pass would otherwise all-reduce
    each layer's gradients as it yields them), on two hosts, in bfloat16: the only collective
    of adapter size is one float32 all-reduce per step of all the adapters' gradients (plus the
    loss); no other collective moves floats (the others gather the batch's token rows)."""
    got = compiled["deep_train:v4-16:bfloat16"]
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
