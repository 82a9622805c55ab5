"""Stationary points of a loss: Hessian-vector products, Lanczos, and a classification.

Jang et al. show that under squared error every second-order stationary point of the
linearized LoRA problem is a global minimum once the rank is large enough. Whether a given
end point of an optimizer is a minimum, a saddle or not stationary at all is read from its
gradient norm and the smallest eigenvalue of its Hessian; the Hessian is never formed:
:func:`hvp` gives ``H v`` by forward-over-reverse differentiation and :func:`lanczos` the
extreme eigenvalues from a few dozen of them.

References:
  Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
  differential and integral operators", 1950.
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation, 1994.
  Jang, Lee, Ryu, "LoRA training in the NTK regime has no spurious local minima", ICML 2024.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from lora_jax.errors import ConfigError

__all__ = ["EndPoint", "Lanczos", "classify", "hvp", "lanczos"]

PyTree = Any


def hvp(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree, data: PyTree = None
) -> Callable[[PyTree], PyTree]:
    """``v -> H v`` at ``params`` for the scalar ``loss_fn(params, data)`` (forward over
    reverse, jitted; ``data`` is passed as an argument, not baked into the program)."""
    grad = jax.grad(loss_fn)
    run = jax.jit(lambda p, v, d: jax.jvp(lambda q: grad(q, d), (p,), (v,))[1])
    return lambda v: run(params, v, data)


class Lanczos(NamedTuple):
    """The Lanczos tridiagonal matrix and its eigenvalues."""

    alpha: np.ndarray  # shape=(k,): diagonal of T.
    beta: np.ndarray  # shape=(k - 1,): off-diagonal of T.
    ritz: np.ndarray  # shape=(k,): eigenvalues of T, ascending (Ritz values).


def lanczos(
    matvec: Callable[[np.ndarray], np.ndarray], dim: int, *, iters: int, seed: int = 0
) -> Lanczos:
    """``iters`` Lanczos steps on a symmetric operator of size ``dim`` (full reorthogonalization).

    The extreme Ritz values converge to the extreme eigenvalues of the operator first; with
    ``iters = dim`` they are all of them (up to rounding). An invariant subspace found early
    (``beta ~ 0``) ends the iteration there.

    Args:
      matvec: ``v [dim] -> A v [dim]`` (float64 numpy in and out).
      dim: the operator's size.
      iters: the most steps (at most ``dim``).
      seed: of the random start vector.

    Returns:
      :class:`Lanczos`.
    """
    if not 1 <= iters <= dim:
        raise ConfigError(f"lanczos needs 1 <= iters <= dim; got iters {iters}, dim {dim}.")
    q = np.random.default_rng(seed).normal(size=dim)
    basis = [q / np.linalg.norm(q)]
    alpha, beta = [], []
    for j in range(iters):
        w = np.asarray(matvec(basis[j]), np.float64)
        alpha.append(float(basis[j] @ w))
        for _ in range(2):  # twice is enough (Kahan's "twice is enough")
            stack = np.stack(basis)  # (j + 1, dim)
            w = w - stack.T @ (stack @ w)
        b = float(np.linalg.norm(w))
        if j == iters - 1 or b <= 1e-12 * max(1.0, abs(alpha[-1])):
            break
        beta.append(b)
        basis.append(w / b)
    a, b = np.asarray(alpha), np.asarray(beta)
    t = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    return Lanczos(a, b, np.linalg.eigvalsh(t))


class EndPoint(enum.Enum):
    """Where an optimizer stopped.

    GLOBAL: a minimum at the lowest loss any start found (or at zero loss).
    SPURIOUS: a minimum (small gradient, Hessian PSD up to tolerance) above that loss.
    SADDLE: a small gradient but a Hessian with a clearly negative eigenvalue.
    NOT_STATIONARY: the gradient is not small (the optimizer had not converged).
    """

    GLOBAL = "global minimum"
    SPURIOUS = "spurious minimum"
    SADDLE = "saddle"
    NOT_STATIONARY = "not stationary"


def classify(
    loss: float, grad_norm: float, lam_min: float, lam_max: float, best_loss: float, *,
    grad_tol: float, hess_tol: float, loss_tol: float,
) -> EndPoint:  # fmt: skip
    """One end point from its loss, gradient norm and extreme Hessian eigenvalues (pure).

    Not stationary when ``grad_norm > grad_tol``; a saddle when
    ``lam_min < -hess_tol * |lam_max|``; else a minimum: global when
    ``loss <= best_loss + loss_tol``, spurious otherwise.
    """
    if grad_norm > grad_tol:
        return EndPoint.NOT_STATIONARY
    if lam_min < -hess_tol * abs(lam_max):
        return EndPoint.SADDLE
    return EndPoint.GLOBAL if loss <= best_loss + loss_tol else EndPoint.SPURIOUS
