"""requirements-tpu.txt is what scripts/requirements_tpu.py writes from uv.lock (offline)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packages() -> dict[str, str]:
    with open(os.path.join(ROOT, "requirements-tpu.txt")) as f:
        pins = [re.match(r"^([\w.\-]+)==([^ ;]+)", line) for line in f]
    return {m.group(1).lower(): m.group(2) for m in pins if m}


def test_the_tpu_set_pins_libtpu_and_leaves_out_tensorflow_torch_and_gpu_wheels():
    pins = _packages()
    assert pins["jax"] == pins["jaxlib"] == "0.9.0.1"
    assert pins["libtpu"].startswith("0.0.34")  # what jax[tpu]==0.9.0.1 pins
    bad = [p for p in pins if re.match(r"(tensorflow|tf2jax|keras|torch|nvidia-)", p)]
    assert bad == []


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH")
def test_requirements_tpu_is_in_sync_with_uv_lock():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "requirements_tpu.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "UV_OFFLINE": "1"},
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
