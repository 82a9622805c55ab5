"""Which Python runs the PyTorch side of a benchmark: ``--torch-python PATH`` or an env variable.

torch is never a dependency of lora_jax; the comparisons run their PyTorch workers in another
interpreter that has torch (and transformers / peft). Shared by ``bench_lora_step.py`` and
``bench_ntk.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

ENV = "LORA_JAX_TORCH_PYTHON"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--torch-python PATH`` (default: ``$LORA_JAX_TORCH_PYTHON``)."""
    parser.add_argument(
        "--torch-python",
        default=os.environ.get(ENV),
        metavar="PATH",
        help=f"a Python interpreter with torch, transformers and peft for the PyTorch side "
        f"(default: ${ENV})",
    )


def resolve(path: str | None, needs: str = "torch") -> str:
    """The interpreter to run, checked: it exists and imports ``needs`` (comma-separated).

    Raises:
      SystemExit: with a one-line message saying what is missing and how to give it.
    """
    if not path:
        raise SystemExit(
            "error: the PyTorch side needs a Python with torch: pass --torch-python PATH or set "
            f"{ENV}=PATH (e.g. a venv made with `pip install torch transformers peft`)."
        )
    exe = shutil.which(path) or path
    if not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        raise SystemExit(f"error: --torch-python {path}: no such executable.")
    modules = ", ".join(m.strip() for m in needs.split(","))
    probe = subprocess.run([exe, "-c", f"import {modules}"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"error: --torch-python {path} cannot import {modules}: {last}")
    return exe
