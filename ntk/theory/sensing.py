"""The linearized LoRA model of a real network as an explicit matrix-sensing problem.

Linearized in the base weights at W0 (Jang et al.), the outputs on N training examples are

    f(a) = f0 + sum_l scale_l < J_l, A_l @ B_l >          J_l = d f / d W_l  [N, K, m, n]

over the adapted kernels W_l (m x n). :func:`lora_jacobians` computes f0 and every J_l once
(reverse mode, in chunks of examples); :func:`outputs` then evaluates the linearized model for
any adapters with one contraction per matrix, so trajectories of thousands of full-batch steps
cost seconds instead of a forward and a JVP of the encoder per step. It is the same function
as :func:`ntk.lora_linearized_model_fn` (tested against it), restricted to adapted kernels
(no trainable biases or saved modules).

Memory: ``N K sum_l m_l n_l`` floats (MiniLM, query + value in 6 layers, 16-shot binary:
64 x 12 x 384^2 x 4 B = 453 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora
from lora_jax import params as params_lib

__all__ = [
    "SensingProblem",
    "gram",
    "levenberg_marquardt",
    "lora_jacobians",
    "outputs",
    "residual_subspace_eigvals",
    "tangent_kernel",
]


class SensingProblem(NamedTuple):
    """Measurements of the linearized LoRA model on one batch."""

    f0: jax.Array  # shape=(N, K): outputs at W0.
    jac: dict[str, jax.Array]  # module path -> (N, K, m, n): d f / d kernel.
    scale: dict[str, float]  # module path -> LoRA scale alpha / r (or / sqrt(r)).


def lora_jacobians(
    output_fn: Callable,
    params: Mapping,
    lora_config: lora.LoraConfig,
    batch: Mapping[str, Any],
    *,
    chunk: int = 4,
) -> SensingProblem:
    """f0 and the Jacobians of ``output_fn`` w.r.t. every kernel ``lora_config`` adapts.

    Args:
      output_fn: ``output_fn(params, batch) -> [N, K]``.
      params: the base params W0.
      lora_config: decides which kernels (paths, scales); its rank is irrelevant here.
      batch: dict of ``[N, ...]`` arrays.
      chunk: examples per reverse-mode Jacobian (memory: chunk x K backward passes at once).

    Returns:
      :class:`SensingProblem` (float32 or the params' dtype).
    """
    plan = lora.resolve(params, lora_config)
    flat = params_lib.flatten(params)
    keys = {path: f"{path}.kernel" for path in plan.lora}
    w0 = {path: flat[key] for path, key in keys.items()}
    rest = params_lib.partition(params, lambda p: p not in set(keys.values()))[0]

    def f(sub, b):
        full = params_lib.unflatten({keys[p]: w for p, w in sub.items()})
        return output_fn(params_lib.combine(full, rest), b)

    jac_fn = jax.jit(jax.jacrev(f))
    f_fn = jax.jit(f)
    n = jax.tree.leaves(batch)[0].shape[0]
    f0, parts = [], []
    for start in range(0, n, chunk):
        b = {name: x[start : start + chunk] for name, x in batch.items()}
        f0.append(f_fn(w0, b))
        parts.append(jac_fn(w0, b))  # path -> (c, K, m, n)
    jac = {p: jnp.concatenate([j[p] for j in parts]) for p in plan.lora}
    scale = {p: t.scale for p, t in plan.lora.items()}
    return SensingProblem(jnp.concatenate(f0), jac, scale)


def outputs(problem: SensingProblem, adapters: Mapping) -> jax.Array:
    """``f0 + sum_l scale_l <J_l, A_l B_l>``: [N, K] (adapters: path -> lora_a, lora_b)."""
    out = problem.f0
    for path, j in problem.jac.items():
        delta = adapters[path]["lora_a"] @ adapters[path]["lora_b"]  # (m, n)
        out = out + problem.scale[path] * jnp.einsum("nkab,ab->nk", j, delta.astype(j.dtype))
    return out


def gram(problem: SensingProblem) -> np.ndarray:
    """``[NK, NK]`` kernel ``sum_l <J_l[i], J_l[j]>`` (the eNTK w.r.t. the adapted kernels)."""
    total = 0.0
    for j in problem.jac.values():
        flat = j.reshape(-1, j.shape[2] * j.shape[3])
        total = total + np.asarray(flat @ flat.T, np.float64)
    return total


def tangent_kernel(problem: SensingProblem, adapters: Mapping) -> np.ndarray:
    """The LoRA tangent kernel ``G G^T`` at ``adapters``: [N K, N K] float64, row = (n, k).

    ``G = d outputs / d (A_l, B_l)`` (:func:`_residual_jacobian`), so this is the empirical
    NTK of the linearized LoRA model over the LoRA parameters (``ntk.empirical_ntk_fn`` of
    ``ntk.lora_linearized_model_fn`` with ``trace_axes=()``, flattened by
    ``ntk.kernel_matrix``; tested against it). For a loss ``mean_n l(f_n)`` the squared
    gradient norm is ``e^T G G^T e / N^2`` with ``e = dl/df`` ([N K]).
    """
    g = np.asarray(_residual_jacobian(problem, adapters), np.float64)  # (NK, P)
    return g @ g.T


def residual_subspace_eigvals(kernel: np.ndarray, k: int) -> np.ndarray:
    """Eigenvalues (ascending) of ``kernel`` [N K, N K] on the residuals whose K entries sum to
    zero per example: where cross-entropy's ``softmax(f) - onehot(y)`` lives. [N (K - 1)].

    Their minimum bounds cross-entropy's gradient: ``||grad L||^2 >= lam ||p - y||^2 / N^2``.
    """
    n = kernel.shape[0] // k
    basis = np.linalg.svd(np.eye(k) - 1.0 / k)[0][:, : k - 1]  # (K, K - 1), orthonormal
    q = np.kron(np.eye(n), basis)  # (NK, N (K - 1))
    return np.linalg.eigvalsh(q.T @ kernel @ q)


def _residual_jacobian(problem: SensingProblem, adapters: Mapping) -> jax.Array:
    """``d outputs / d (A_l, B_l)`` by hand: [N K, sum_l r (m + n)], A's columns then B's.

    ``d f[n, k] / d A_l = scale_l J_l[n, k] B_l^T`` (m x r) and
    ``d f[n, k] / d B_l = scale_l A_l^T J_l[n, k]`` (r x n): two passes over each J_l.
    """
    cols = []
    for path, j in problem.jac.items():
        a, b = adapters[path]["lora_a"], adapters[path]["lora_b"]  # (m, r), (r, n)
        s = problem.scale[path]
        nk = j.shape[0] * j.shape[1]
        cols.append(s * jnp.einsum("nkmb,rb->nkmr", j, b).reshape(nk, -1))
        cols.append(s * jnp.einsum("mr,nkmb->nkrb", a, j).reshape(nk, -1))
    return jnp.concatenate(cols, axis=1)


def levenberg_marquardt(
    problem: SensingProblem,
    targets: jax.Array,
    adapters: Mapping,
    *,
    iters: int,
    damping: float = 1e-2,
) -> tuple[np.ndarray, dict]:
    """Squared error ``1/2 ||outputs(a) - targets||^2 / N`` minimized by Levenberg-Marquardt.

    Each iteration solves ``(G G^T + lam I) c = res`` with ``G`` the [N K, P] Jacobian of the
    outputs in the factors, steps by ``-G^T c`` and keeps it only if the loss falls (then
    ``lam / 3``; else ``lam * 4``), as :mod:`ntk.theory.cstar`'s LM. Only ``lora_a`` /
    ``lora_b`` of the adapted paths move.

    Args:
      problem: the sensing problem.
      targets: [N, K] targets (e.g. one-hot labels).
      adapters: the start (path -> ``lora_a`` [m, r], ``lora_b`` [r, n]).
      iters: iterations.
      damping: the initial lam.

    Returns:
      ``(losses, adapters)``: the loss at the start and after each iteration ([iters + 1]),
      and the last adapters.
    """
    n = problem.f0.shape[0]
    paths = list(problem.jac)
    sizes = [(adapters[p]["lora_a"].shape, adapters[p]["lora_b"].shape) for p in paths]

    def unpack(x):
        out, i = {}, 0
        for p, (sa, sb) in zip(paths, sizes, strict=True):
            a = x[i : i + sa[0] * sa[1]].reshape(sa)
            i += sa[0] * sa[1]
            b = x[i : i + sb[0] * sb[1]].reshape(sb)
            i += sb[0] * sb[1]
            out[p] = {"lora_a": a, "lora_b": b}
        return out

    def res_of(x, problem, targets):
        return (outputs(problem, unpack(x)) - targets).reshape(-1)

    def loss_of(x, problem, targets):
        r = res_of(x, problem, targets)
        return 0.5 * jnp.sum(r * r) / n

    @jax.jit
    def step(x, lam, problem, targets):  # the problem is an argument, not a baked constant
        r = res_of(x, problem, targets)
        g = _residual_jacobian(problem, unpack(x))  # (NK, P)
        c = jnp.linalg.solve(g @ g.T + lam * jnp.eye(g.shape[0], dtype=g.dtype), r)
        new = x - g.T @ c
        better = loss_of(new, problem, targets) < loss_of(x, problem, targets)
        x = jnp.where(better, new, x)
        lam = jnp.clip(jnp.where(better, lam / 3.0, lam * 4.0), 1e-12, 1e12)
        return x, lam, loss_of(x, problem, targets)

    x = jnp.concatenate(
        [jnp.concatenate([adapters[p]["lora_a"].ravel(), adapters[p]["lora_b"].ravel()])
         for p in paths]
    )  # fmt: skip
    lam = jnp.asarray(damping, x.dtype)
    losses = [float(loss_of(x, problem, targets))]
    for _ in range(iters):
        x, lam, value = step(x, lam, problem, targets)
        losses.append(float(value))
    return np.asarray(losses), unpack(x)
