"""The paper's grid on a pod (issue 26): ``experiments.run`` trains a task's LoRA cells as one
job whose members are split over every device of every process, padded with idle members to a
multiple of the devices; and a run that loses a process stops with one line and resumes.

The oracle is the same grid run one cell at a time on one device (``--no-vectorize``).
Simulated CPU devices (``--xla_force_host_platform_device_count``) and two processes on
localhost (``jax.distributed``, gloo collectives) stand in for a slice's chips and hosts.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _env import simulated_devices
from test_experiments import smoke_args

from experiments import report
from experiments.run import main
from lora_jax import distributed
from lora_jax.testing import make_tiny_checkpoint

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
COMPARED = ("dev_accuracy", "test_accuracy", "best_step", "trainable_params")
# 5 head cells (each a job of one whose batch of 4 no mesh below splits: idle copies) and
# 10 LoRA cells (one job of 10: padded to 16 on data=16, to 12 on 4 devices).
GRID = ("--methods", "head", "lora", "--seeds", "1", "2", "3", "4", "5", "--lr", "3e-2")


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


@pytest.fixture(scope="module")
def one_at_a_time(tiny_roberta, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_at_a_time")
    main(smoke_args(tiny_roberta, out, *GRID, "--no-vectorize"))
    return out


def _records(out):
    records = report.read_results(os.path.join(out, "smoke", "results.jsonl"))
    return {(r["task"], r["method"], r["rank"], r["seed"]): r for r in records}


def _assert_same_records(out, oracle, cells=15):
    got, want = _records(out), _records(oracle)
    assert got.keys() <= want.keys() and len(got) == cells
    for key, record in got.items():
        assert {k: got[key][k] for k in COMPARED} == {k: record[k] for k in COMPARED}, key
    for r, s in [(r, s) for r in (1, 2) for s in (1, 5)]:  # the curves, first and last member
        name = os.path.join("smoke", "metrics", f"mr_lora-r{r}_seed{s}.jsonl")
        a, b = (report.read_results(os.path.join(d, name)) for d in (out, oracle))
        assert [x["step"] for x in a] == [x["step"] for x in b] == [2, 4]
        np.testing.assert_allclose(
            [[x["train_loss"], x["dev_loss"]] for x in a],
            [[x["train_loss"], x["dev_loss"]] for x in b],
            rtol=1e-5,
        )


def _env(devices: int) -> dict:
    return simulated_devices(
        devices,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([ROOT, HERE]),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(commands: list[list[str]], devices: int) -> list[tuple[int, str, float]]:
    """Runs the commands side by side; ``(return code, stderr, seconds)`` of each."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            c, env=_env(devices), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for c in commands
    ]  # fmt: skip
    out = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        out.append((p.returncode, err, time.monotonic() - start))
    return out


def _run_args(model, out, *extra):
    return [*smoke_args(model, out, *GRID), *extra]


def _two_processes(args: list[str], first: list[str] | None = None):
    """Process 0 runs ``python -m experiments.run args``; process 1 the same, or ``first``
    followed by them."""
    port = str(_free_port())
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    run = [sys.executable, "-m", "experiments.run"]
    return _processes(
        [[*run, *args, *flags, "0"], [*(first or run), *args, *flags, "1"]], devices=2
    )


@pytest.mark.slow
def test_ten_cells_on_sixteen_devices_write_the_records_of_one_cell_at_a_time(
    tiny_roberta, one_at_a_time, tmp_path
):
    command = [sys.executable, "-m", "experiments.run"]
    args = _run_args(tiny_roberta, tmp_path, "--mesh", "data=16")
    ((code, err, _),) = _processes([[*command, *args]], devices=16)
    assert code == 0, err[-3000:]
    assert "mr lora x10" in err  # one job of ten members
    _assert_same_records(tmp_path, one_at_a_time)


@pytest.mark.slow
def test_two_processes_that_lose_one_stop_with_one_line_and_resume_to_the_same_records(
    tiny_roberta, one_at_a_time, tmp_path
):
    args = _run_args(tiny_roberta, tmp_path, "--methods", "lora", "--process-timeout", "10")
    stop = [sys.executable, os.path.join(HERE, "_stop_after_save.py"), "KILL"]
    (code, err, _), (lost_code, _, _) = _two_processes(args, first=stop)
    assert lost_code == -9  # process 1 died after its first checkpoint
    assert code == distributed.LOST_EXIT_CODE, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Re-run the same command" in last, err[-3000:]
    # Re-running the same command resumes: the finished cells stay, the job continues.
    (code, err, _), (code1, err1, _) = _two_processes(args)
    assert code == code1 == 0, (err[-3000:], err1[-3000:])
    assert "0 cells done, 10 to run" in err  # the job had not finished: it resumed
    _assert_same_records(tmp_path, one_at_a_time, cells=10)


@pytest.mark.slow
def test_a_process_that_hangs_is_detected_within_the_timeout(tiny_roberta, tmp_path):
    """SIGSTOP keeps process 1's sockets open, so no collective fails: only the heartbeat
    watch can tell that it is gone."""
    args = _run_args(tiny_roberta, tmp_path, "--methods", "lora", "--process-timeout", "5")
    stop = [sys.executable, os.path.join(HERE, "_stop_after_save.py"), "STOP"]
    port = str(_free_port())
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    env = _env(2)
    p0 = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args, *flags, "0"],
        env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    p1 = subprocess.Popen([*stop, *args, *flags, "1"], env=env, cwd=ROOT, text=True,
                          stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _, err = p0.communicate(timeout=600)
    finally:
        p1.kill()
        p1.wait()
    assert p0.returncode == distributed.LOST_EXIT_CODE, err[-3000:]
    assert "process 1 of 2 sent no heartbeat for 5 s" in err.strip().splitlines()[-1]
