"""Multi-process training: two CPU processes on localhost (jax.distributed, gloo collectives).

The oracle is the same run in one process over the same number of devices; the two-process run
is stopped after 2 steps and resumed from its orbax checkpoint to 4.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from _env import simulated_devices

from lora_jax import distributed, lora

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "_multihost_run.py")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "out of range"),
        ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": -1}, "out of range"),
        ({"coordinator": "127.0.0.1:1234"}, "missing --num-processes, --process-id"),
        ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator": "h:1", "num_processes": 1, "process_id": 0, "auto": True}, "combine"),
    ],
)
def test_bad_process_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


def test_no_arguments_means_one_process():
    assert distributed.initialize() is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, devices: int, out: str, steps: int, *order: str) -> None:
    env = simulated_devices(devices)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), str(nproc), port, out, str(steps), *order],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(nproc)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process of 4 devices, and two of 2 devices each whose mesh interleaves them (as TPU
    slices order devices), stopped after 2 steps and resumed to 4. (The pod-grid tests run two
    processes in the contiguous order.)"""
    one = str(tmp_path_factory.mktemp("one_process"))
    two = str(tmp_path_factory.mktemp("two_processes"))
    _launch(1, 4, one, 4)
    _launch(2, 2, two, 2, "interleaved")  # stopped after 2 steps ...
    _launch(2, 2, two, 4, "interleaved")  # ... and resumed to 4
    return one, two


def _result(directory):
    with open(os.path.join(directory, "result.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_two_processes_resumed_equal_one_process(runs):
    one, two = map(_result, runs)
    assert one["devices"] == two["devices"] == 4
    assert len(two["losses"]) == 2  # the step-2 record came back with the checkpoint
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    np.testing.assert_allclose(two["dev_loss"], one["dev_loss"], rtol=1e-6)
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processes_whose_rows_interleave_equal_one_process(runs):
    """A mesh ordered process 0, 1, 0, 1 (TPU slices order devices physically): each process
    owns rows 0-1 and 4-5, or 2-3 and 6-7, of a batch of 8; the data are still placed right."""
    one, interleaved = map(_result, runs)
    assert interleaved["owners"] == [0, 1, 0, 1]
    np.testing.assert_allclose(interleaved["losses"], one["losses"], rtol=1e-6)
    np.testing.assert_allclose(interleaved["logits"], one["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_only_process_zero_writes(runs):
    _, two = runs
    assert os.path.exists(os.path.join(two, "metrics_0.jsonl"))
    assert not os.path.exists(os.path.join(two, "metrics_1.jsonl"))
    with open(os.path.join(two, "metrics_0.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]


@pytest.mark.slow
def test_adapters_saved_from_the_sharded_run_load_with_the_same_logits(runs):
    sys.path.insert(0, HERE)
    from _mesh_runs import tiny_problem

    from lora_jax import programs
    from lora_jax.trainable import make_model_fn

    _, two = runs
    adapters, cfg = lora.load_peft(os.path.join(two, "peft"))
    output_fn, params, data = tiny_problem()
    assert len(adapters) == 2  # query and value of the one layer: no key lost
    logits = programs.make_predict(make_model_fn(output_fn, "lora", lora_config=cfg), 16)(
        adapters, params, data
    )
    np.testing.assert_allclose(logits, _result(two)["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_kernels_on_a_mesh_over_two_processes_equal_one_device(runs):
    """The A-SignGD kernel with rows over a mesh of two processes' interleaved devices equals
    the kernel computed on one device by process 0 alone."""
    result = _result(runs[1])
    mesh, one = np.asarray(result["kernel_mesh"]), np.asarray(result["kernel_one_device"])
    assert mesh.shape == (16, 12)  # the output axis traced
    np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-6)
    assert np.abs(one).max() > 0
