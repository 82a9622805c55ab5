"""The constant C* of the manifold rank condition, estimated by simulation.

The linearized LoRA model fits KN numbers ``y_i = <A_i, dW>`` with ``dW = U V^T`` of rank r
(U: m x r, V: n x r). With Gaussian-iid measurement matrices A_i (m x n) this is random
low-rank matrix sensing. For each draw (A, y, init) a solver minimizes

    L(U, V) = 1/2 sum_i (<A_i, U V^T> - y_i)^2

and the draw *succeeds* when ``L_end / L_start <= tol``. Success is recorded as a function of

    rho = (r (m + n) - r^2) / KN          (manifold dimension per constraint)

and the transition rho_50 (50% success) is C*: the manifold condition reads ``rho > C*``.

Capacity and optimization are told apart by the solver: the measurements ``y`` are generic
(Gaussian, *not* planted), so no rank-r solution exists below rho = 1 (a d-dimensional image
cannot cover R^KN), and a generic solution exists once ``r max(m, n) >= KN`` (fix V generic:
the problem is linear in U with r m unknowns), i.e. at rho >= (r (m + n) - r^2) / (r max(m, n))
(< 2). The true capacity constant lies between; what a solver reports on top of it is an
optimization effect, which shrinks as the solver gets stronger or its budget longer.

Solvers (:class:`Solver`): plain gradient descent (losses recorded at several budgets from one
trajectory), Adam, Levenberg-Marquardt (Gauss-Newton with adaptive damping), and ``LSTSQ``, the
exact unconstrained least-squares solution (only for r = min(m, n), where the factorization can
express every matrix: interpolation is possible exactly when mn >= KN, i.e. rho >= 1; the test
case with a known answer).

Every draw of one (shape, KN, solver) point runs in one jitted, vmapped program.

References:
  Jang, Lee, Ryu, "LoRA Training in the NTK Regime has No Spurious Local Minima",
  arXiv:2402.11867, 2024.
  Burer, Monteiro, "A nonlinear programming algorithm for solving semidefinite programs via
  low-rank factorization", Math. Programming, 2003.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "Failures",
    "Point",
    "classify_failures",
    "failure_counts",
    "Solver",
    "Transition",
    "block_draws",
    "isotonic",
    "kn_grid",
    "rho",
    "simulate",
    "solve",
    "transition",
]


class Solver(enum.StrEnum):
    """How the factorized least-squares problem is solved.

    Attributes:
      GD: plain full-batch gradient descent, fixed step ``lr``; the loss is recorded after each
        of ``budgets`` steps (one trajectory, several budgets).
      ADAM: optax Adam with cosine decay from ``lr`` over the largest budget; recorded at
        ``budgets``. Scale-free steps: good at the ill-conditioned end.
      LM: Levenberg-Marquardt: ``delta = -J^T (J J^T + lam I)^-1 res`` on (U, V) with the
        damping ``lam`` divided by 3 after a step that lowers the loss and multiplied by 4 (step
        rejected) otherwise; ``budgets`` count iterations. Second order: the strong solver.
      LSTSQ: the exact least-squares solution over all m x n matrices (no factorization); only
        for r = min(m, n). The oracle with a known transition (rho = 1).
    """

    GD = "gd"
    ADAM = "adam"
    LM = "lm"
    LSTSQ = "lstsq"


def rho(m: int, n: int, r: int, kn: int) -> float:
    """``(r (m + n) - r^2) / KN``."""
    return (r * (m + n) - r * r) / kn


def kn_grid(m: int, n: int, r: int, rhos: np.ndarray | list[float]) -> list[int]:
    """Distinct KN values ``round(dim / rho)`` for the requested rho values (descending KN)."""
    dim = r * (m + n) - r * r
    return sorted({max(1, round(dim / float(x))) for x in rhos}, reverse=True)


def _draws(
    seed: int, draws: int, kn: int, kn_max: int, m: int, n: int, r: int, init_scale: float, dtype
) -> tuple[np.ndarray, ...]:
    """Measurements, targets and initial factors of ``draws`` problems (host numpy).

    M [draws, kn_max, m n] has N(0, 1/(m n)) entries, y [draws, kn_max] N(0, 1/KN) entries;
    rows from ``kn`` on are zero (they add nothing to the loss, the gradient or the
    Gauss-Newton step, so one compiled program serves every KN <= kn_max). U0 [draws, m, r] and
    V0 [draws, n, r] have N(0, init_scale^2) entries. Everything depends on (seed, m, n, r, KN)
    only, so points are independent and reproducible.
    """
    rng = np.random.default_rng((seed, m, n, r, kn))
    a = np.zeros((draws, kn_max, m * n), dtype)
    y = np.zeros((draws, kn_max), dtype)
    a[:, :kn] = rng.standard_normal((draws, kn, m * n)) / np.sqrt(m * n)
    y[:, :kn] = rng.standard_normal((draws, kn)) / np.sqrt(kn)
    u = init_scale * rng.standard_normal((draws, m, r)).astype(dtype)
    v = init_scale * rng.standard_normal((draws, n, r)).astype(dtype)
    return a, y, u, v


def _loss(a, y, u, v):
    res = a @ (u @ v.T).reshape(-1) - y  # (KN,)
    return 0.5 * jnp.sum(res * res)


def _gd(a, y, u, v, budgets, lr):
    grad = jax.grad(_loss, argnums=(2, 3))

    def step(carry, _):
        u, v = carry
        gu, gv = grad(a, y, u, v)
        return (u - lr * gu, v - lr * gv), None

    return _run_segments(step, (u, v), budgets, lambda c: _loss(a, y, *c))


def _adam(a, y, u, v, budgets, lr):
    opt = optax.adam(optax.cosine_decay_schedule(lr, budgets[-1], alpha=1e-3))
    grad = jax.grad(_loss, argnums=(2, 3))

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(grad(a, y, *params), state, params)
        return (optax.apply_updates(params, updates), state), None

    return _run_segments(step, ((u, v), opt.init((u, v))), budgets, lambda c: _loss(a, y, *c[0]))


def _lm(a, y, u, v, budgets, lam0):
    m, r = u.shape
    n = v.shape[0]
    kn = a.shape[0]
    a3 = a.reshape(kn, m, n)

    def residual(u, v):
        return a @ (u @ v.T).reshape(-1) - y

    def step(carry, _):
        u, v, lam = carry
        res = residual(u, v)
        ju = jnp.einsum("imn,nr->imr", a3, v).reshape(kn, m * r)  # d res / d U
        jv = jnp.einsum("imn,mr->inr", a3, u).reshape(kn, n * r)  # d res / d V
        jac = jnp.concatenate([ju, jv], axis=1)  # (KN, r (m + n))
        gram = jac @ jac.T + lam * jnp.eye(kn, dtype=a.dtype)
        delta = -jac.T @ jnp.linalg.solve(gram, res)
        u_new = u + delta[: m * r].reshape(m, r)
        v_new = v + delta[m * r :].reshape(n, r)
        better = jnp.sum(residual(u_new, v_new) ** 2) < jnp.sum(res**2)
        u = jnp.where(better, u_new, u)
        v = jnp.where(better, v_new, v)
        lam = jnp.clip(jnp.where(better, lam / 3.0, lam * 4.0), 1e-12, 1e12)
        return (u, v, lam), None

    lam = jnp.asarray(lam0, a.dtype)
    return _run_segments(step, (u, v, lam), budgets, lambda c: _loss(a, y, c[0], c[1]))


def _run_segments(step, carry, budgets, loss_of):
    """Runs ``step`` for ``budgets[-1]`` steps, returning the loss after each budget: [B]."""
    losses, done = [], 0
    for b in budgets:
        carry, _ = jax.lax.scan(step, carry, None, length=b - done)
        losses.append(loss_of(carry))
        done = b
    return jnp.stack(losses)


def _lstsq(a, y, *_):
    # SVD-based least squares over all m x n matrices; zero (padding) rows change nothing.
    x, *_ = jnp.linalg.lstsq(a, y)
    res = a @ x - y
    return 0.5 * jnp.sum(res * res)[None]


class Point(NamedTuple):
    """One (shape, KN, solver) point of the simulation."""

    m: int
    n: int
    r: int
    kn: int
    rho: float
    ratios: np.ndarray  # shape=(draws, budgets): L_end / L_start after each budget.


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _simulate_jit(a, y, u, v, solver, budgets, lr):
    def one(a, y, u, v):
        start = _loss(a, y, u, v)
        fn = {Solver.GD: _gd, Solver.ADAM: _adam, Solver.LM: _lm, Solver.LSTSQ: _lstsq}[solver]
        ratio = fn(a, y, u, v, budgets, lr) / start
        return jnp.where(jnp.isfinite(ratio), ratio, jnp.inf)  # diverged: failure

    return jax.vmap(one)(a, y, u, v)


def simulate(
    seed: int,
    m: int,
    n: int,
    r: int,
    kn: int,
    *,
    solver: Solver | str = Solver.GD,
    draws: int = 100,
    budgets: tuple[int, ...] = (2500, 5000, 20000),
    lr: float | None = None,
    init_scale: float = 1e-2,
    dtype=np.float32,
    kn_max: int | None = None,
) -> Point:
    """Solves ``draws`` random rank-r sensing problems with KN measurements of m x n matrices.

    Args:
      seed: the draws (measurements, targets, init) come from numpy's generator seeded with
        ``(seed, m, n, r, KN)``.
      m, n, r: matrix shape and factor rank.
      kn: number of measurements (KN).
      solver: a :class:`Solver`.
      draws: independent problems, solved in one vmapped program.
      budgets: increasing step (GD, Adam) or iteration (LM) counts at which the loss is read.
      lr: GD / Adam step size, LM initial damping (defaults 0.2, 1e-2, 1e-2).
      init_scale: standard deviation of the entries of the initial U and V (small random init).
      dtype: float32 or float64 (the latter needs ``jax_enable_x64``).
      kn_max: compile for this many measurement rows (>= kn; default kn), so that a grid of
        KN values shares one program.

    Returns:
      :class:`Point` with ``ratios`` [draws, len(budgets)] (``[draws, 1]`` for LSTSQ; inf for a
      diverged run).

    Raises:
      ValueError: for LSTSQ with r < min(m, n), r > min(m, n), or non-increasing budgets.
    """
    solver = Solver(solver)
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must be in [1, min(m, n)] = [1, {min(m, n)}].")
    if solver == Solver.LSTSQ and r != min(m, n):
        raise ValueError(
            f"solver='lstsq' ignores the rank, so it needs r = min(m, n) = {min(m, n)}; got r={r}."
        )
    budgets = tuple(int(b) for b in budgets)
    if not budgets or any(b <= 0 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise ValueError(f"budgets must be increasing positive step counts, got {budgets}.")
    if lr is None:
        lr = {Solver.GD: 0.2, Solver.ADAM: 1e-2, Solver.LM: 1e-2, Solver.LSTSQ: 0.0}[solver]
    kn_max = kn if kn_max is None else kn_max
    if not 1 <= kn <= kn_max:
        raise ValueError(f"need 1 <= kn <= kn_max, got kn={kn}, kn_max={kn_max}.")
    arrays = _draws(seed, draws, kn, kn_max, m, n, r, init_scale, np.dtype(dtype))
    ratios = _simulate_jit(*arrays, solver, budgets, float(lr))
    return Point(m, n, r, kn, rho(m, n, r, kn), np.asarray(ratios, np.float64))


def block_draws(
    jac: np.ndarray, seed: int, draws: int, n_examples: int, m: int, n: int, r: int, *,
    kn_max: int | None = None, init_scale: float = 1e-2, dtype=np.float32,
) -> tuple[np.ndarray, ...]:  # fmt: skip
    """Sensing problems from real Jacobians, in :func:`simulate`'s layout.

    Draw i takes ``n_examples`` of the P examples, m of the M rows and n of the N columns at
    random (without replacement): its KN = n_examples K measurement matrices are the real
    Jacobian entries on that block (LoRA restricted to an m x n block of the kernel), scaled
    so that the KN x mn operator has spectral norm 1 (conditioning kept, the step size fixed).
    Targets y ~ N(0, 1/KN) (generic, as in :func:`simulate`), U0, V0 ~ N(0, init_scale^2).

    Args:
      jac: [P, K, M, N] Jacobians of the K outputs w.r.t. one kernel.

    Returns:
      ``(a [draws, kn_max, m n], y [draws, kn_max], u [draws, m, r], v [draws, n, r])``; rows
      from KN on are zero. Depends on (seed, n_examples, m, n, r) only.
    """
    p, k, big_m, big_n = jac.shape
    if not (1 <= n_examples <= p and 1 <= r <= min(m, n) and m <= big_m and n <= big_n):
        raise ValueError(
            f"need 1 <= n_examples <= {p}, m <= {big_m}, n <= {big_n}, 1 <= r <= min(m, n); "
            f"got n_examples={n_examples}, m={m}, n={n}, r={r}."
        )
    kn = n_examples * k
    kn_max = kn if kn_max is None else kn_max
    rng = np.random.default_rng((seed, n_examples, m, n, r))
    a = np.zeros((draws, kn_max, m * n), dtype)
    y = np.zeros((draws, kn_max), dtype)
    for i in range(draws):
        ex = rng.choice(p, n_examples, replace=False)
        rows, cols = rng.choice(big_m, m, replace=False), rng.choice(big_n, n, replace=False)
        block = np.asarray(jac[ex][:, :, rows][:, :, :, cols], np.float64).reshape(kn, m * n)
        a[i, :kn] = block / np.linalg.norm(block, 2)
        y[i, :kn] = rng.standard_normal(kn) / np.sqrt(kn)
    u = init_scale * rng.standard_normal((draws, m, r)).astype(dtype)
    v = init_scale * rng.standard_normal((draws, n, r)).astype(dtype)
    return a, y, u, v


def solve(
    arrays: tuple[np.ndarray, ...], solver: Solver | str, budgets: tuple[int, ...], lr: float
) -> np.ndarray:
    """``L_end / L_start`` [draws, budgets] of the problems ``arrays`` (``a, y, u, v`` as
    :func:`block_draws` returns them) solved by ``solver`` (inf where a run diverged)."""
    out = _simulate_jit(*arrays, Solver(solver), tuple(int(b) for b in budgets), float(lr))
    return np.asarray(out, np.float64)


class Failures(NamedTuple):
    """Gradient descent's end points, restarted by Levenberg-Marquardt (one point)."""

    m: int
    n: int
    r: int
    kn: int
    rho: float
    gd: np.ndarray  # shape=(draws,): GD's L_end / L_start.
    restart: np.ndarray  # shape=(draws,): after LM from GD's end, over the same L_start.


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _gd_then_lm(a, y, u, v, steps, lr, lm_iters):
    grad = jax.grad(_loss, argnums=(2, 3))

    def one(a, y, u, v):
        start = _loss(a, y, u, v)

        def step(carry, _):
            u, v = carry
            gu, gv = grad(a, y, u, v)
            return (u - lr * gu, v - lr * gv), None

        (u, v), _ = jax.lax.scan(step, (u, v), None, length=steps)
        gd = _loss(a, y, u, v) / start
        restart = _lm(a, y, u, v, (lm_iters,), 1e-2)[0] / start
        bad = lambda x: jnp.where(jnp.isfinite(x), x, jnp.inf)  # noqa: E731
        return bad(gd), bad(restart)

    return jax.vmap(one)(a, y, u, v)


def classify_failures(
    seed: int, m: int, n: int, r: int, kn: int, *, draws: int = 100, steps: int = 20000,
    lr: float = 0.2, lm_iters: int = 300, init_scale: float = 1e-2, dtype=np.float32,
    kn_max: int | None = None,
) -> Failures:  # fmt: skip
    """GD for ``steps`` on the draws of :func:`simulate` (same seed: the same problems and
    starts), then Levenberg-Marquardt for ``lm_iters`` from each GD end point.

    A draw GD fails but the restart solves was slow convergence (GD was on its way); one the
    restart cannot solve either ended at a spurious minimum, or (rho < 1) on a problem with no
    rank-r solution. :func:`failure_counts` sorts them.
    """
    kn_max = kn if kn_max is None else kn_max
    arrays = _draws(seed, draws, kn, kn_max, m, n, r, init_scale, np.dtype(dtype))
    gd, restart = _gd_then_lm(*arrays, int(steps), float(lr), int(lm_iters))
    return Failures(m, n, r, kn, rho(m, n, r, kn), np.asarray(gd, np.float64),
                    np.asarray(restart, np.float64))  # fmt: skip


def failure_counts(gd: np.ndarray, restart: np.ndarray, tol: float) -> dict[str, int]:
    """``solved`` (GD reached ``tol``), ``slow`` (GD did not, LM from its end did) and
    ``stuck`` (neither), from :class:`Failures` ratios (pure)."""
    gd, restart = np.asarray(gd), np.asarray(restart)
    solved = gd <= tol
    slow = ~solved & (restart <= tol)
    return {"solved": int(solved.sum()), "slow": int(slow.sum()),
            "stuck": int((~solved & ~slow).sum())}  # fmt: skip


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, size]
    for value, weight in zip(np.asarray(y, float), np.asarray(w, float), strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, s2 = blocks.pop()
            v1, w1, s1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, s1 + s2])
    return np.concatenate([np.full(s, v) for v, _, s in blocks])


def _crossing_at(rhos: np.ndarray, success: np.ndarray, level: float) -> tuple[float, int]:
    """rho where the isotonic success curve first reaches ``level`` (linear interpolation),
    and the index of the first grid point (in ascending rho) at or above ``level``.

    ``(nan, len(grid))`` when the curve stays below ``level``; ``(smallest rho, 0)`` when it
    starts above.
    """
    order = np.argsort(rhos)
    x = rhos[order]
    p = isotonic(success[order].mean(axis=1), np.full(len(x), success.shape[1]))
    above = np.nonzero(p >= level)[0]
    if above.size == 0:
        return float("nan"), len(x)
    i = int(above[0])
    if i == 0:
        return float(x[0]), 0
    x0, x1, p0, p1 = x[i - 1], x[i], p[i - 1], p[i]
    return float(x0 + (level - p0) * (x1 - x0) / (p1 - p0)), i


def _crossing(rhos: np.ndarray, success: np.ndarray, level: float) -> float:
    return _crossing_at(rhos, success, level)[0]


class Transition(NamedTuple):
    """The 50% point of success vs rho with a bootstrap interval."""

    rho50: float  # nan: success stayed below 50% over the grid
    low: float  # interval (nan where undefined: past a grid end, or no bootstrap bound)
    high: float
    censored: str  # '' or 'below-grid' / 'above-grid' when rho50 is at or past a grid end


def transition(
    rhos: np.ndarray,
    success: np.ndarray,
    *,
    level: float = 0.5,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Transition:
    """rho at which success reaches ``level``, with a stratified bootstrap interval.

    The estimate is the crossing of the isotonic (non-decreasing) regression of the success
    fractions, interpolated linearly between grid points. The bootstrap resamples the draws
    of every grid point with replacement (``n_boot`` times) and takes percentile bounds of
    the (equally interpolated) resampled crossings. The interval is widened to hold the grid
    cell the crossing falls in: the curve is unknown between grid points, so a sharp step
    (every resample crossing at the same place) gives that cell, not a zero-width interval.
    It is undefined (nan) on a side where the crossing is censored: below the grid's first
    point (low) or never reached (both), and where too few resamples cross (high).

    Args:
      rhos: [G] grid values.
      success: [G, draws] booleans.
    """
    rhos = np.asarray(rhos, float)
    success = np.asarray(success, bool)
    est, cell = _crossing_at(rhos, success, level)
    rng = np.random.default_rng(seed)
    g, d = success.shape
    boots = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, d, size=(g, d))
        boots[b] = _crossing(rhos, np.take_along_axis(success, idx, axis=1), level)
    tail = (1 - confidence) / 2
    finite = boots[np.isfinite(boots)]
    if finite.size < n_boot * (1 - tail):  # too many resamples never cross: no upper bound
        low = float(np.quantile(finite, tail)) if finite.size else float("nan")
        high = float("nan")
    else:
        boots = np.where(np.isfinite(boots), boots, np.inf)
        low, high = (float(q) for q in np.quantile(boots, [tail, 1 - tail]))
    grid = np.sort(rhos)
    censored = ""
    if np.isnan(est):
        censored, low, high = "above-grid", float("nan"), float("nan")
    elif cell == 0:
        censored, low = "below-grid", float("nan")
    else:
        low = min(low, float(grid[cell - 1])) if np.isfinite(low) else low
        high = max(high, float(grid[cell])) if np.isfinite(high) else high
    return Transition(est, low, high, censored)
