"""The on-disk kernel cache: one ``.npy`` per kernel, named by a hash of all it depends on."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ntk.models import ModelInfo, fingerprint, fn_fingerprint

PyTree = Any

__all__ = ["cache_path", "function_key", "load_kernel", "save_kernel"]


def function_key(f: Callable, info: ModelInfo) -> str:
    """What ``f`` computes: ``info.fingerprint`` if set, else :func:`fn_fingerprint` of ``f``.

    Raises:
      ntk.FingerprintError: if ``f`` depends on an object with no content to hash.
    """
    return str(info.fingerprint) if info.fingerprint is not None else fn_fingerprint(f)


def cache_path(
    cache_dir: str | os.PathLike,
    f: Callable,
    info: ModelInfo,
    options: tuple,
    x1: PyTree,
    x2: PyTree,
    params,
) -> Path:
    """``cache_dir/ntk-<hash>.npy``: the hash covers f (code, closure, or ``info.fingerprint``),
    params, inputs, options."""
    key = fingerprint(
        {"params": params, "x1": x1, "x2": x2 or {}}, function_key(f, info), options, x2 is None
    )
    return Path(cache_dir) / f"ntk-{key[:40]}.npy"


def load_kernel(path: Path) -> np.ndarray | None:
    return np.load(path) if path.exists() else None


def save_kernel(path: Path, kernel: np.ndarray) -> None:
    """Writes atomically (a temporary file, then a rename): no half-written kernel is read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as fh:
        np.save(fh, kernel)
    os.replace(fh.name, path)
