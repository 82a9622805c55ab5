"""The benchmarks' PyTorch interpreter comes from --torch-python or the environment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import torch_python  # noqa: E402


def test_missing_interpreter_says_how_to_give_it():
    with pytest.raises(SystemExit, match="--torch-python PATH or set LORA_JAX_TORCH_PYTHON"):
        torch_python.resolve(None)
    with pytest.raises(SystemExit, match="no such executable"):
        torch_python.resolve("/nonexistent/python")
    with pytest.raises(SystemExit, match="cannot import no_such_module_x"):
        torch_python.resolve(sys.executable, "no_such_module_x")
    assert torch_python.resolve(sys.executable, "json") == sys.executable


@pytest.mark.parametrize("script", ["bench_lora_step.py", "bench_ntk.py", "bench_forward.py"])
def test_benchmarks_take_the_interpreter_from_the_option_or_env(script):
    env = {k: v for k, v in os.environ.items() if k != torch_python.ENV}
    cmd = [sys.executable, str(BENCH / script), "--compare"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "--torch-python PATH or set LORA_JAX_TORCH_PYTHON" in proc.stderr
    env[torch_python.ENV] = "/nonexistent/python"  # the environment variable is read
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert "--torch-python /nonexistent/python: no such executable" in proc.stderr
    assert "/work/" not in (BENCH / script).read_text()  # no hard-coded interpreter


def test_roofline_finds_every_dot_and_where_it_runs():
    """The dots read from compiled HLO, against the closed-form FLOPs of a known program."""
    import bench_roofline
    import jax
    import jax.numpy as jnp

    def f(x, w, u, v):
        def body(carry, _):
            return jnp.tanh(carry @ w), None  # (32, 64) @ (64, 64), once per iteration

        y, _ = jax.lax.scan(body, x, None, length=5)
        z = jnp.einsum("bij,bjk->bik", u, v)  # (4, 5, 6) @ (4, 6, 7), once
        return y.sum() + z.sum()

    args = [jnp.ones(s) for s in ((32, 64), (64, 64), (4, 5, 6), (4, 6, 7))]
    loop, outside = bench_roofline.hlo_dots(jax.jit(f).lower(*args).compile().as_text())
    assert sum(n * d.flops for d, n in loop.items()) == 2 * 32 * 64 * 64
    assert sum(n * d.flops for d, n in outside.items()) == 2 * 4 * 5 * 6 * 7
    (batched,) = outside
    assert batched.batch != ((), ())  # the batch dimension is kept, not counted as output
