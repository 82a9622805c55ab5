"""Test helpers for ntk: per-dtype tolerances, a tiny MLP, and a hand-built J J^T oracle."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: (rtol, atol) per dtype for kernel / output comparisons.
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-4, 2e-5),
}


def tolerance(dtype: Any) -> dict[str, float]:
    """``{'rtol': ..., 'atol': ...}`` for comparing arrays of ``dtype``."""
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    return {"rtol": rtol, "atol": atol}


def mlp(key: jax.Array, sizes=(5, 8, 3), dtype=jnp.float64) -> tuple[Any, dict]:
    """A tanh MLP ``f(params, batch) -> [N, K]`` on ``batch['x']`` plus its params."""
    params = {}
    keys = jax.random.split(key, len(sizes))
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(keys[i], (a, b), dtype) / np.sqrt(a),
            "bias": 0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (b,), dtype),
        }

    def f(params, batch):
        h = batch["x"]
        n = len(params)
        for i in range(n):
            h = h @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
            if i < n - 1:
                h = jnp.tanh(h)
        return h

    return f, params


def jacobian_matrix(f, params, batch) -> np.ndarray:
    """``[N, K, P]`` Jacobian by ``jax.jacrev``, leaves flattened and concatenated."""
    jac = jax.jit(jax.jacrev(f))(params, batch)
    leaves = jax.tree.leaves(jac)
    n, k = leaves[0].shape[:2]
    return np.concatenate([np.asarray(j).reshape(n, k, -1) for j in leaves], axis=-1)


def hand_ntk(f, params, x1, x2=None) -> np.ndarray:
    """``[N1, N2, K, K]`` kernel ``J(x1) J(x2)^T`` written out with einsum.

    The two batches are concatenated (when their shapes allow) so one Jacobian is compiled.
    """
    if x2 is None:
        j1 = jacobian_matrix(f, params, x1)
        return np.einsum("akp,blp->abkl", j1, j1)
    n1 = jax.tree.leaves(x1)[0].shape[0]
    try:
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
    except (TypeError, ValueError):
        j1, j2 = jacobian_matrix(f, params, x1), jacobian_matrix(f, params, x2)
    else:
        j = jacobian_matrix(f, params, both)
        j1, j2 = j[:n1], j[n1:]
    return np.einsum("akp,blp->abkl", j1, j2)
