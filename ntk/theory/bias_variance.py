"""Bias and variance of the linearized LoRA model over rank: a fit term and a Rademacher term.

The class at rank r and per-matrix Frobenius budget B_l is

    F_{r,B} = { x -> f0(x) + sum_l <J_l(x), dW_l> :  rank dW_l <= r,  ||dW_l||_F <= B_l }

* **fit (bias)**: ``fit(r) = min_{F_{r,B}} (1/N) sum_n loss(f(x_n), y_n)``, the training-loss
  floor at rank r (:func:`fit_curve`: Adam on the LoRA factors with the update mapped
  radially into the ball, every rank in one program). It can only fall with r.
* **complexity (variance)**: the empirical Rademacher complexity of the class, taken jointly
  over all K outputs as Maurer's inequality uses it, is exactly

      R(r) = E_sigma sup_{F_{r,B}} (1/N) sum_{n,k} sigma_{nk} f_k(x_n)
           = sum_l B_l E_sigma || Z_l ||_(2,r),     Z_l = (1/N) sum_{n,k} sigma_{nk} J_l[n, k]

  where ``||Z||_(2,r) = sqrt(sum of the r largest squared singular values)`` (the supremum of
  ``<Z, X>`` over rank <= r, ``||X||_F <= B`` is ``B ||Z||_(2,r)``; it is at most
  ``sqrt(r) B ||Z||_op``: the sqrt(r) growth). :func:`rademacher_curve` estimates it by Monte
  Carlo over sigma (or exactly, enumerating all sign vectors, for small N K). One supremum
  per output (``joint=False``) is an upper bound, looser by up to sqrt(K).

The bound (Maurer's vector-contraction inequality, arXiv:1605.00251, 2016, with the standard
symmetrization bound of Bartlett & Mendelson, JMLR 2002): for a loss with values in [0, c]
that is G-Lipschitz in the K outputs (Euclidean norm), with probability >= 1 - delta over N
training examples, every f in F_{r,B} has

    test loss <= train loss + 2 sqrt(2) G R(r) + 3 c sqrt(log(2 / delta) / (2 N)).

Here: softmax cross-entropy clipped at c = 1 nat, ``G = sqrt(2)`` (its gradient in the logits,
``softmax - onehot``, has norm <= sqrt(2)), delta = 0.05; the training term is the unclipped
cross-entropy floor (an upper bound of the clipped one). :data:`LIPSCHITZ` and
:func:`complexity_term` hold these constants. Caveat: B chosen from the same training data
makes the bound heuristic; :func:`grid_budgets` and ``confidence_term(n, count)`` make it a
real one: the bound is taken at each budget rounded up to a fixed geometric grid, and holds
for every grid point and rank at once when each gets ``delta / count`` (a union bound over
``count = levels^matrices x ranks`` classes: ``log(2 count / delta)`` in the confidence
term). The bound is vacuous whenever fit + complexity + confidence exceeds c = 1 nat.

Budgets: :func:`fit_with_norms` trains every rank without a ball and reports the Frobenius
norm of each trained update, the budget B_l(r) of its own rank;
:func:`min_norm_budgets` gives the norms of the minimum-Frobenius-norm update that fits the
one-hot targets exactly (kernel regression with the eNTK of the adapted kernels).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.losses import get_loss
from ntk.theory.sensing import SensingProblem, gram

__all__ = [
    "CONFIDENCE_DELTA",
    "LIPSCHITZ",
    "LOSS_BOUND",
    "BiasVariance",
    "FitNorms",
    "bias_variance",
    "complexity_term",
    "confidence_term",
    "fit_curve",
    "fit_with_norms",
    "grid_budgets",
    "ky_fan_2",
    "min_norm_budgets",
    "rademacher_curve",
    "rademacher_terms",
]

#: Euclidean Lipschitz constant of softmax cross-entropy in the logits.
LIPSCHITZ = float(np.sqrt(2.0))
#: Clipping level c of the loss (nats) in the confidence term.
LOSS_BOUND = 1.0
#: delta of the high-probability bound.
CONFIDENCE_DELTA = 0.05


def ky_fan_2(z: np.ndarray, ranks: list[int] | tuple[int, ...]) -> np.ndarray:
    """``sqrt(sum_{i <= r} s_i(z)^2)`` for every r in ``ranks``: [..., len(ranks)]."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)  # (..., min(m, n))
    cum = np.cumsum(s * s, axis=-1)
    idx = np.minimum(np.asarray(ranks) - 1, s.shape[-1] - 1)
    return np.sqrt(cum[..., idx])


def min_norm_budgets(problem: SensingProblem, labels: np.ndarray, *, ridge: float = 1e-8) -> dict:
    """Per-matrix ``||dW_l||_F`` of the minimum-norm update fitting ``onehot(labels) - f0``.

    ``dW_l = sum_i c_i J_l[i]`` with ``c = (G + ridge tr(G)/NK I)^-1 (y - f0)``, G = :func:`gram`.
    """
    f0 = np.asarray(problem.f0, np.float64)
    n, k = f0.shape
    res = (np.eye(k)[np.asarray(labels)] - f0).reshape(-1)
    g = gram(problem)
    c = np.linalg.solve(g + ridge * np.trace(g) / g.shape[0] * np.eye(g.shape[0]), res)
    out = {}
    for path, j in problem.jac.items():
        flat = np.asarray(j, np.float64).reshape(n * k, -1)
        out[path] = float(np.linalg.norm(c @ flat))
    return out


def rademacher_terms(
    problem: SensingProblem,
    ranks: list[int] | tuple[int, ...],
    *,
    draws: int = 32,
    seed: int = 0,
    exact: bool = False,
    joint: bool = True,
) -> dict[str, np.ndarray]:
    """Per adapted matrix and sign vector, the supremum at unit budget: path -> [S, len(ranks)].

    ``joint`` (Maurer's form, the exact supremum over the class, all outputs at once): one sign
    per (example, output), ``Z_l = (1/N) sum_{n,k} sigma_{nk} J_l[n, k]`` and the entry is
    ``||Z_l||_(2,r)``; otherwise one sign per example and output k's supremum taken on its own,
    the entry is ``sum_k ||Z_{l,k}||_(2,r)`` (looser: up to sqrt(K) above the joint one).

    Args:
      problem: the sensing problem (``J_l`` [N, K, m, n]).
      ranks: ranks r.
      draws: Monte-Carlo sign vectors (ignored with ``exact``).
      seed: seed of the sign vectors.
      exact: enumerate every sign vector (2^(N K) joint, 2^N otherwise; at most 2^16).
      joint: signs per (example, output) and one supremum over all outputs.
    """
    n, k = problem.f0.shape
    width = n * k if joint else n
    if exact:
        if width > 16:
            raise ValueError(
                f"exact=True enumerates 2^{width} sign vectors; too many (at most 2^16): "
                "use Monte Carlo (exact=False)."
            )
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=width)))
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(draws, width))
    out = {}
    for path, j in problem.jac.items():
        j = np.asarray(j, np.float64)  # (N, K, m, n)
        if joint:
            z = np.einsum("dnk,nkab->dab", signs.reshape(-1, n, k), j) / n  # (S, m, n)
            out[path] = ky_fan_2(z, ranks)
        else:
            z = np.einsum("dn,nkab->dkab", signs, j) / n  # (S, K, m, n)
            out[path] = ky_fan_2(z, ranks).sum(axis=1)
    return out


def rademacher_curve(
    problem: SensingProblem,
    ranks: list[int] | tuple[int, ...],
    budgets: dict,
    *,
    draws: int = 32,
    seed: int = 0,
    exact: bool = False,
    joint: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The Rademacher complexity at each rank and its Monte-Carlo standard error.

    ``R(r) = sum_l B_l(r) E_sigma ||Z_l||_(2,r)`` (:func:`rademacher_terms`), with
    ``budgets[path]`` a float (the same at every rank) or a ``[len(ranks)]`` array (a budget
    per rank, e.g. the trained adapters' norms).

    Returns:
      ``(R, se)``, each [len(ranks)] (se is 0 with ``exact``).
    """
    terms = rademacher_terms(problem, ranks, draws=draws, seed=seed, exact=exact, joint=joint)
    total = sum(np.asarray(budgets[p], np.float64) * t for p, t in terms.items())  # (S, R)
    if exact:
        return total.mean(axis=0), np.zeros(len(ranks))
    return total.mean(axis=0), total.std(axis=0, ddof=1) / np.sqrt(len(total))


def complexity_term(rademacher: np.ndarray) -> np.ndarray:
    """``2 sqrt(2) G R`` (symmetrization's 2, Maurer's sqrt(2), G = :data:`LIPSCHITZ`): 4 R."""
    return 2.0 * np.sqrt(2.0) * LIPSCHITZ * np.asarray(rademacher)


def confidence_term(n: int, count: int = 1) -> float:
    """``3 c sqrt(log(2 count / delta) / (2 N))``: rank-independent; ``count`` classes share
    delta by a union bound (``delta / count`` each)."""
    return 3.0 * LOSS_BOUND * float(np.sqrt(np.log(2.0 * count / CONFIDENCE_DELTA) / (2.0 * n)))


def grid_budgets(
    norms: dict[str, np.ndarray], *, base: float, levels: int, ratio: float = 2.0
) -> dict[str, np.ndarray]:
    """Each norm rounded up to the grid ``B_j = base ratio^j``, ``j = 0 .. levels - 1``; inf
    past the last point (the bound is then vacuous there)."""
    out = {}
    for path, v in norms.items():
        v = np.asarray(v, np.float64)
        j = np.ceil(np.log(np.maximum(v, base) / base) / np.log(ratio) - 1e-9)
        j = np.where(base * ratio**j < v, j + 1, j)  # rounding: never below the norm
        out[path] = np.where(j <= levels - 1, base * ratio**j, np.inf)
    return out


@functools.partial(jax.jit, static_argnames=("loss", "steps", "r_max"))
def _fit(jac, scale, f0, labels, budgets, a0, mask, *, loss, steps, r_max, lr):
    loss_fn = get_loss(loss)
    opt = optax.adam(lr)

    def deltas(params):
        # (R, m, n) per path: scale * (A * mask) @ B for each rank member, radially mapped into
        # the ball ||dW||_F <= B_l (the identity inside it): an unconstrained parametrization
        # of {rank <= r} intersected with the ball.
        out = {}
        for p in jac:
            a = params[p]["a"] * mask[:, None, :]
            raw = scale[p] * jnp.einsum("qmr,qrn->qmn", a, params[p]["b"])
            norm = jnp.sqrt(jnp.sum(raw * raw, axis=(1, 2)) + 1e-30)  # (R,)
            bounded = jnp.isfinite(budgets[p])  # inf: no ball (kept out of the gradient)
            shrink = jnp.minimum(1.0, jnp.where(bounded, budgets[p], 0.0) / norm)
            out[p] = raw * jnp.where(bounded, shrink, 1.0)[:, None, None]
        return out

    def member_losses(params):
        out = f0[None]
        for p, d in deltas(params).items():
            out = out + jnp.einsum("nkab,qab->qnk", jac[p], d)  # one pass over J, all ranks
        return jax.vmap(loss_fn, in_axes=(0, None))(out, labels)  # (R,)

    def total(params):
        values = member_losses(params)
        return values.sum(), values

    params = {
        p: {"a": a0[p], "b": jnp.zeros((a0[p].shape[0], r_max, jac[p].shape[3]))} for p in jac
    }
    state = opt.init(params)

    def step(carry, _):
        params, state, best = carry
        (_, values), grads = jax.value_and_grad(total, has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state, jnp.minimum(best, values)), None

    best0 = jnp.full(mask.shape[0], jnp.inf)
    (params, _, best), _ = jax.lax.scan(step, (params, state, best0), None, length=steps)
    last = member_losses(params)
    norms = {p: jnp.sqrt(jnp.sum(d * d, axis=(1, 2))) for p, d in deltas(params).items()}
    return jnp.minimum(best, last), last, norms


def _members(problem: SensingProblem, ranks, seed: int) -> tuple:
    """``(r_max, mask [R, r_max], A0 per path [R, m, r_max])`` of the rank members."""
    ranks = list(ranks)
    r_max = max(ranks)
    mask = jnp.asarray(np.arange(r_max)[None, :] < np.asarray(ranks)[:, None], jnp.float32)
    key = jax.random.key(seed)
    a0 = {}
    for i, (p, j) in enumerate(problem.jac.items()):
        m = j.shape[2]
        a0[p] = jax.random.normal(jax.random.fold_in(key, i), (len(ranks), m, r_max)) / np.sqrt(m)
    return r_max, mask, a0


def fit_curve(
    problem: SensingProblem,
    labels: np.ndarray,
    ranks: list[int] | tuple[int, ...],
    budgets: dict,
    *,
    loss: str = "ce",
    steps: int = 500,
    lr: float = 1e-2,
    seed: int = 0,
) -> np.ndarray:
    """Training-loss floor at each rank within the Frobenius budgets: [len(ranks)].

    Adam on ``(A, B)`` from ``A`` Gaussian (std 1/sqrt(m)), ``B = 0`` (the update starts at 0),
    with ``dW = scale A B min(1, B_l / ||scale A B||_F)``; all ranks are members of one program
    (ranks padded to the largest with a mask: padded columns get zero gradients). The floor is
    the smallest loss seen along the run.
    """
    r_max, mask, a0 = _members(problem, ranks, seed)
    jac = dict(problem.jac)
    scale = {p: float(problem.scale[p]) for p in jac}
    b = {p: jnp.asarray(budgets[p], jnp.float32) for p in jac}
    out, _, _ = _fit(
        jac, scale, problem.f0, jnp.asarray(labels), b, a0, mask,
        loss=loss, steps=steps, r_max=r_max, lr=lr,
    )  # fmt: skip
    return np.asarray(out, np.float64)


class FitNorms(NamedTuple):
    """Rank members trained without a norm ball: their end loss and update norms."""

    loss: np.ndarray  # shape=(R,): training loss of the last iterate at each rank
    norms: dict  # path -> shape=(R,): ||dW_l||_F of the last iterate at each rank


def fit_with_norms(
    problem: SensingProblem,
    labels: np.ndarray,
    ranks: list[int] | tuple[int, ...],
    *,
    loss: str = "ce",
    steps: int = 500,
    lr: float = 1e-2,
    seed: int = 0,
) -> FitNorms:
    """:func:`fit_curve`'s training with no ball; the budget of rank r is its own update's norm.

    The class ``F_{r, B(r)}`` with ``B_l(r) = ||dW_l(r)||_F`` of the trained update contains
    it, so the end loss is that class's training loss and the pair enters the bound as is
    (with B chosen from the data: see the module docstring's caveat).
    """
    r_max, mask, a0 = _members(problem, ranks, seed)
    jac = dict(problem.jac)
    scale = {p: float(problem.scale[p]) for p in jac}
    b = {p: jnp.asarray(np.inf, jnp.float32) for p in jac}
    _, last, norms = _fit(
        jac, scale, problem.f0, jnp.asarray(labels), b, a0, mask,
        loss=loss, steps=steps, r_max=r_max, lr=lr,
    )  # fmt: skip
    return FitNorms(
        np.asarray(last, np.float64), {p: np.asarray(v, np.float64) for p, v in norms.items()}
    )


class BiasVariance(NamedTuple):
    """Both terms over rank and the rank where their sum is smallest."""

    ranks: np.ndarray  # shape=(R,)
    fit: np.ndarray  # shape=(R,): training-loss floor (bias)
    complexity: np.ndarray  # shape=(R,): 2 sqrt(2) G R(r) (variance)
    total: np.ndarray  # fit + complexity (+ the rank-independent confidence term, not added)
    best_rank: int


def bias_variance(ranks, fit: np.ndarray, complexity: np.ndarray) -> BiasVariance:
    """Sum and argmin (the smallest rank among ties)."""
    ranks = np.asarray(ranks)
    total = np.asarray(fit) + np.asarray(complexity)
    return BiasVariance(
        ranks, np.asarray(fit), np.asarray(complexity), total, int(ranks[np.argmin(total)])
    )
