"""Where a transition point goes: its limit as the step budget or the problem size grows.

GD's transition point ``rho_p(T)`` (p = 50% or 95% success, :func:`ntk.theory.cstar.transition`)
falls as its budget T grows: more draws reach the threshold. The paper's constant is the point
GD settles at, so each series of points is extrapolated with

    point(x) = point_inf + a x^(-b)          b > 0

(x = the budget T, or the manifold dimension of the shape for finite-size scaling). For a
fixed b the model is linear in (point_inf, a); b is profiled over a log-spaced grid (least
squares); b can also be fixed (b = 1: the leading finite-size correction a / x). The limit is
*undefined* when fewer than three finite points are given (two with b fixed), or when the
best b sits at the grid's smallest value with a visible trend (the points still move like
log x: no limit is identified). Its interval is the percentile interval of the same fit over
bootstrap resamples of the draws (:func:`bootstrap_crossings`), widened to the grid cell of
rho the limit falls in (the success curve is unknown between grid points), undefined when too
many resamples are undefined or on a side past the grid's end.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ntk.theory import cstar

__all__ = [
    "Extrapolation",
    "boot_limits",
    "bootstrap_crossings",
    "extrapolate",
    "power_law_fit",
]

#: Exponents b profiled by :func:`power_law_fit` (log-spaced).
B_GRID = np.geomspace(0.05, 4.0, 120)


def bootstrap_crossings(
    rhos: np.ndarray, success: np.ndarray, *, level: float, n_boot: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` crossing per column of ``success`` and its bootstrap resamples.

    Args:
      rhos: [G] grid.
      success: [G, B, D] booleans (B series, e.g. budgets of one trajectory, on the same D
        draws: every resample takes the same draws for all B, keeping them paired).
      level: success level (0.5, 0.95).
      n_boot: resamples.

    Returns:
      ``(estimates [B], boots [n_boot, B])``; nan where the crossing is censored (never
      reached, or at or below the grid's first point: the true point is then unknown).
    """
    rhos = np.asarray(rhos, float)
    success = np.asarray(success, bool)
    g, nb, d = success.shape

    def cross(s):  # s: (G, D)
        est, cell = cstar._crossing_at(rhos, s, level)
        return est if cell > 0 else float("nan")

    est = np.array([cross(success[:, b]) for b in range(nb)])
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, nb))
    for i in range(n_boot):
        idx = rng.integers(0, d, size=(g, 1, d))
        res = np.take_along_axis(success, np.broadcast_to(idx, success.shape), axis=2)
        boots[i] = [cross(res[:, b]) for b in range(nb)]
    return est, boots


def power_law_fit(x, y, *, b_grid: np.ndarray = B_GRID) -> tuple[float, float, float, str]:
    """Least squares ``y ~ y_inf + a x^(-b)`` over finite points: ``(y_inf, a, b, reason)``.

    ``reason`` is '' for a defined limit; otherwise y_inf is nan and reason says why (fewer
    than three finite points; the best b at the grid's lower end with a visible trend). A
    one-value ``b_grid`` fixes b (e.g. 1: the leading finite-size correction ``a / x``), and
    two points then suffice. Constant points give ``a = 0`` and their mean.
    """
    fixed = len(b_grid) == 1
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < (2 if fixed else 3):
        return float("nan"), float("nan"), float("nan"), "too few finite points"
    scale = float(np.ptp(y))
    if scale <= 1e-12 * max(1.0, float(np.abs(y).max())):  # constant points
        return float(y.mean()), 0.0, float("nan"), ""
    best = (np.inf, 0.0, 0.0, 0.0)
    for b in b_grid:
        design = np.stack([np.ones_like(x), x ** (-b)], axis=1)  # (P, 2)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ coef - y) ** 2))
        if sse < best[0] - 1e-15 * scale**2:
            best = (sse, float(coef[0]), float(coef[1]), float(b))
    _, y_inf, a, b = best
    if b == b_grid[0] and not fixed:
        return float("nan"), a, b, f"no limit: the best exponent is the smallest tried ({b:g})"
    return y_inf, a, b, ""


def boot_limits(x, estimates, boots: np.ndarray, *, b_grid: np.ndarray = B_GRID) -> np.ndarray:
    """The :func:`power_law_fit` limit of each resample ``boots`` [n_boot, P]: [n_boot].

    nan where the resample loses a point the estimate has (or the estimate has fewer than
    three); -inf / +inf where its fit has no limit with falling / rising points.
    """
    x, estimates = np.asarray(x, float), np.asarray(estimates, float)
    finite = np.isfinite(estimates)
    out = np.full(len(boots), np.nan)
    if finite.sum() < (2 if len(b_grid) == 1 else 3):
        return out
    for i, row in enumerate(np.asarray(boots, float)):
        if np.isfinite(row[finite]).all():
            lim, a, _, why = power_law_fit(x[finite], row[finite], b_grid=b_grid)
            out[i] = lim if not why else (-np.inf if a > 0 else np.inf)
    return out


class Extrapolation(NamedTuple):
    """A series' limit ``point_inf`` with its interval (nan where undefined)."""

    value: float
    low: float
    high: float
    a: float
    b: float  # nan for constant points
    reason: str  # '' or why the limit or its interval is undefined


def extrapolate(
    x,
    estimates,
    boots: np.ndarray,
    *,
    grid: np.ndarray | None = None,
    confidence: float = 0.95,
    b_grid: np.ndarray = B_GRID,
) -> Extrapolation:
    """The limit of ``estimates`` [P] over ``x`` [P] (:func:`power_law_fit`) with a bootstrap
    interval from ``boots`` [n_boot, P] (the same fit per resample).

    A resample that loses a crossing the estimate has is undefined; one whose fit has no limit
    (still moving like log x) has its limit at -inf (falling points) or +inf (rising). The
    interval is nan when more than ``(1 - confidence) / 2`` of the resamples are undefined;
    else the percentile interval (nan on an infinite side), widened to hold the cell of
    ``grid`` (the rho grid) the limit falls in, and nan on a side where the limit lies past
    the grid's end.
    """
    estimates = np.asarray(estimates, float)
    y_inf, a, b, reason = power_law_fit(x, estimates, b_grid=b_grid)
    if reason:
        return Extrapolation(float("nan"), float("nan"), float("nan"), a, b, reason)
    fits = boot_limits(x, estimates, boots, b_grid=b_grid)
    tail = (1 - confidence) / 2
    if np.mean(np.isnan(fits)) > tail:
        why = f"{np.mean(np.isnan(fits)):.0%} of the resamples lose a crossing"
        return Extrapolation(y_inf, float("nan"), float("nan"), a, b, why)
    big = np.clip(fits[~np.isnan(fits)], -1e300, 1e300)  # no-limit resamples at the ends
    low, high = (float(q) for q in np.quantile(big, [tail, 1 - tail]))
    low = low if abs(low) < 1e299 else float("nan")
    high = high if abs(high) < 1e299 else float("nan")
    why = "" if np.isfinite([low, high]).all() else "resamples with no limit: one side unbounded"
    low, high = _min(low, y_inf), _max(high, y_inf)  # nan (undefined) stays nan
    if grid is not None:
        g = np.sort(np.asarray(grid, float))
        if y_inf < g[0]:
            return Extrapolation(y_inf, float("nan"), _max(high, g[0]), a, b, "below the grid")
        if y_inf > g[-1]:
            return Extrapolation(y_inf, _min(low, g[-1]), float("nan"), a, b, "above the grid")
        i = int(np.searchsorted(g, y_inf, side="right"))
        low = _min(low, g[max(i - 1, 0)])
        high = _max(high, g[min(i, len(g) - 1)])
    return Extrapolation(y_inf, float(low), float(high), a, b, why)


def _min(x: float, y: float) -> float:
    return float("nan") if np.isnan(x) else float(min(x, y))


def _max(x: float, y: float) -> float:
    return float("nan") if np.isnan(x) else float(max(x, y))
