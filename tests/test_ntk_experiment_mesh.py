"""``experiments.run --ntk --mesh``: the NTK analysis of a cell (the linearized model's training
and the kernels) runs on the run's mesh and writes the records of the same run on one device.

Both runs happen in one subprocess (tests/_ntk_experiment_mesh_run.py) started with 8 simulated
CPU devices: the oracle on one device, then ``--mesh data=8``. A tiny encoder (1 layer, hidden
16), one AdamW LoRA cell, so both of ``--ntk-kernel matched``'s kernels (the SGD eNTK and
A-SignGD).
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _env import simulated_devices
from jax.sharding import AxisType

from experiments import report
from experiments.ntk_analysis import kernel_mesh
from lora_jax.errors import ConfigError
from lora_jax.testing import make_tiny_checkpoint

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "roberta", num_layers=1, hidden=16, heads=2,
        intermediate=32,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("runs")
    args = [
        "--model", str(model), "--name", "ntk", "--tasks", "mr", "--methods", "lora",
        "--ranks", "1", "--seeds", "13", "--k", "4", "--steps", "2", "--eval-every", "2",
        "--batch-size", "8", "--max-length", "32", "--test-cap", "16", "--ntk",
    ]  # fmt: skip
    one, mesh = out / "one", out / "mesh"
    env = simulated_devices(8, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    command = [sys.executable, os.path.join(HERE, "_ntk_experiment_mesh_run.py")]
    command += [*args, "--out", str(one), "---", *args, "--out", str(mesh), "--mesh", "data=8"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"one": (one / "ntk", seen[0]), "mesh": (mesh / "ntk", seen[1])}


@pytest.mark.slow
def test_ntk_analysis_ran_on_the_mesh(runs):
    (_, one), (_, mesh) = runs["one"], runs["mesh"]
    assert one == {"kernel_devices": [1], "linearized_meshes": [None]}
    # Every kernel program on the 8 devices, the linearized model trained on the run's mesh.
    assert mesh == {"kernel_devices": [8], "linearized_meshes": [{"data": 8}]}


@pytest.mark.slow
def test_ntk_records_on_the_mesh_equal_one_device(runs):
    (record,) = report.read_results(runs["one"][0] / "results.jsonl")
    (other,) = report.read_results(runs["mesh"][0] / "results.jsonl")
    keys = sorted(k for k in record if k.startswith("ntk_"))
    assert keys == sorted(k for k in other if k.startswith("ntk_"))
    assert "ntk_acc_kernel" in keys and "ntk_acc_kernel_asigngd" in keys
    for key in keys:
        if key.startswith(("ntk_acc_", "ntk_agree_")):  # accuracies and agreements: equal
            assert other[key] == record[key], key
        else:  # float32 training and kernels: data-parallel sums round differently
            assert math.isclose(other[key], record[key], rel_tol=1e-4, abs_tol=1e-12), key


@pytest.mark.slow
def test_initial_kernels_on_the_mesh_equal_one_device(runs):
    """The kernels at initialization (the kernel cache's files of the same inputs and
    parameters; those of the trained adapters differ in name, as training rounds differently):
    the SGD eNTK and A-SignGD of [train; test] x train, equal to float32 rounding."""
    (one, _), (mesh, _) = runs["one"], runs["mesh"]
    names = sorted(set(os.listdir(one / "kernel_cache")) & set(os.listdir(mesh / "kernel_cache")))
    assert len(names) == 2
    for name in names:
        a, b = np.load(one / "kernel_cache" / name), np.load(mesh / "kernel_cache" / name)
        assert a.shape == b.shape == (8 + 16, 8, 2, 2)  # [train; test] x train, K x K
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_kernels_take_the_runs_data_and_fsdp_axes():
    auto = dict(axis_types=(AxisType.Auto,) * 2)
    assert kernel_mesh(None) == {}
    mesh = jax.make_mesh((1, 1), ("data", "tensor"), **auto)
    assert kernel_mesh(mesh) == {"mesh": mesh, "data_axis": "data", "fsdp_axis": None}
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), **auto)
    assert kernel_mesh(mesh)["fsdp_axis"] == "fsdp"
    with pytest.raises(ConfigError, match="--mesh fsdp=1,tensor=1 has none"):
        kernel_mesh(jax.make_mesh((1, 1), ("fsdp", "tensor"), **auto))
