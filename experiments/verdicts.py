"""The verdict of each claim of the paper, as small pure functions of numbers.

Every function here maps measured numbers to one of :data:`SUPPORTED`, :data:`NOT_SUPPORTED`
or :data:`INCONCLUSIVE`, and each of the three is reachable (``tests/test_theory_verdicts.py``
has a synthetic case per branch). :mod:`experiments.paper_claims` computes the numbers and
calls these; nothing here trains, loads or reads files.

* claim 1, the rank-1 conclusion (:func:`rank_one_conclusion`): rank 1 meets
  ``dim > C* KN`` for every C* in the measured interval, for none, or for some;
* claim 1, the constant (:func:`cstar_constant`): the paper's 1.35 inside every defined 95%
  interval of gradient descent's transition (its limit as the budget grows, per shape and
  over sizes), outside every one, or neither (an undefined interval never counts as
  excluding it);
* claim 1 on the real problem (:func:`no_spurious_minima`): random starts of squared error
  at r = 1 end at zero-loss minima, a spurious minimum, or neither;
* the NTK regime every guarantee assumes (:func:`ntk_regime`): real runs' weight-space
  linearization errors all within a tolerance, all beyond it, or mixed;
* claim 2 (:func:`pl_lojasiewicz`, :func:`squared_error_threshold`, :func:`pl_contrast`):
  cross-entropy reaches the target loss on every seed with
  ``||grad L|| >= c L`` after the plateau (exponent q of ``||grad L|| ~ L^q`` at most 1);
* claim 3 (:func:`bias_variance_task`): the training-loss floor saturates at r = 1 for K = 2
  and keeps falling for K > 2, and a non-vacuous bound has its minimum on the right side;
* claim 4 (:func:`rank_comparison`): rank 1 against a rank fixed in advance (12): binary
  tasks by an equivalence test (TOST) against a margin, multi-class tasks by a one-sided test
  of a rise with rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from experiments import stats

__all__ = [
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "bias_variance_task",
    "combine",
    "cstar_constant",
    "lojasiewicz_exponent",
    "no_spurious_minima",
    "ntk_regime",
    "pl_lojasiewicz",
    "pl_contrast",
    "plateau_end",
    "rank_comparison",
    "rank_one_conclusion",
    "squared_error_threshold",
    "stalled",
]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """One verdict of several parts: any not supported wins, then any inconclusive."""
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return SUPPORTED if verdicts and all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


def _defined(interval) -> bool:
    return interval is not None and all(x is not None and math.isfinite(x) for x in interval)


# --- claim 1 ---------------------------------------------------------------------------------


def rank_one_conclusion(dim_r1: int, kn: int, c_interval: tuple[float, float] | None) -> dict:
    """Does rank 1 meet ``dim(r = 1) > C* KN`` for the measured C*?

    ``c_max = dim / KN`` is the largest C* for which rank 1 still passes. Supported when the
    whole interval lies below it (``high < c_max``), not supported when it lies above
    (``low >= c_max``), otherwise inconclusive (``c_max`` inside the interval, or an interval
    bound undefined on the side that decides).

    Args:
      dim_r1: manifold dimension at rank 1 (summed over adapted matrices, or one matrix).
      kn: number of fitted numbers KN.
      c_interval: ``(low, high)`` of C* (nan / None where undefined).
    """
    c_max = dim_r1 / kn
    low, high = (float("nan"), float("nan")) if c_interval is None else c_interval
    low = float("nan") if low is None else float(low)
    high = float("nan") if high is None else float(high)
    if math.isfinite(high) and high < c_max:
        verdict = SUPPORTED
    elif math.isfinite(low) and low >= c_max:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return {"c_max": c_max, "low": low, "high": high, "verdict": verdict}


def cstar_constant(intervals: dict[str, tuple[float, float] | None], c_star: float) -> dict:
    """Is ``c_star`` (the paper's 1.35) inside the measured 95% interval of every shape?

    Supported when every interval is defined and contains it; not supported when every
    interval is defined and excludes it; otherwise inconclusive. An undefined interval (a
    transition past the grid, or one the bootstrap cannot bound) is neither.

    Returns:
      ``verdict``, ``inside`` / ``outside`` / ``undefined`` (lists of shapes).
    """
    inside, outside, undefined = [], [], []
    for shape, interval in intervals.items():
        if not _defined(interval):
            undefined.append(shape)
        elif interval[0] <= c_star <= interval[1]:
            inside.append(shape)
        else:
            outside.append(shape)
    if intervals and not undefined and not outside:
        verdict = SUPPORTED
    elif intervals and not undefined and not inside:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return {"verdict": verdict, "inside": inside, "outside": outside, "undefined": undefined}


def no_spurious_minima(counts: dict[str, int], *, dim: int, kn: int, fits: bool) -> dict:
    """Claim 1 on the real problem: random starts of the squared-error problem at r = 1.

    ``counts``: end points per class (:class:`ntk.theory.landscape.EndPoint` values); ``fits``:
    the lowest end loss is zero (an interpolating solution exists and was found).

    * ``dim <= kn``: **inconclusive** (below the count the claim promises nothing);
    * any spurious minimum: **not supported**;
    * every start at a global minimum and ``fits``: **supported**;
    * otherwise (saddles, starts not stationary, or no start fits): **inconclusive**.
    """
    total = sum(counts.values())
    if dim <= kn:
        return {"verdict": INCONCLUSIVE, "reason": f"dim {dim} <= KN {kn}"}
    if counts.get("spurious minimum", 0):
        why = f"{counts['spurious minimum']} of {total} starts end at a spurious minimum"
        return {"verdict": NOT_SUPPORTED, "reason": why}
    if total and counts.get("global minimum", 0) == total and fits:
        return {"verdict": SUPPORTED, "reason": f"all {total} starts end at a zero-loss minimum"}
    why = "saddles or non-stationary end points, or no start fits" if total else "no starts"
    return {"verdict": INCONCLUSIVE, "reason": why}


def ntk_regime(errors: Sequence[float], *, tol: float) -> dict:
    """The assumption of every guarantee: real fine-tuning stays near its linearization.

    ``errors``: weight-space linearization errors ``||f(W0 + dW) - f_lin|| / ||f(W0 + dW) -
    f(W0)||`` of real runs (every rank and seed). **supported** when all are at most ``tol``,
    **not supported** when all exceed it, **inconclusive** when mixed or none.
    """
    small = [e <= tol for e in errors]
    if small and all(small):
        return {"verdict": SUPPORTED, "reason": f"every run within {tol:g}"}
    if small and not any(small):
        return {"verdict": NOT_SUPPORTED, "reason": f"every run above {tol:g}"}
    return {"verdict": INCONCLUSIVE, "reason": f"{sum(small)} of {len(small)} runs within {tol:g}"}


# --- claim 2 ---------------------------------------------------------------------------------


def plateau_end(loss: Sequence[float], *, window: int = 5) -> int:
    """The step where the loss curve leaves its initial plateau.

    The escape from the B = 0 start is where ``log L`` falls fastest: the argmax of
    ``-(log L_{t+window} - log L_t)`` (a ``window``-step difference, robust to one-step
    wiggles), returned as ``t + window``. On a curve with no plateau (steepest at the start)
    it is ``window``.

    Args:
      loss: ``[T]`` positive losses along the run.
      window: difference span in steps.
    """
    x = np.log(np.maximum(np.asarray(loss, np.float64), 1e-300))
    if x.size <= window:
        return 0
    drop = x[:-window] - x[window:]
    return int(np.argmax(drop)) + window


def lojasiewicz_exponent(loss: Sequence[float], grad_norm: Sequence[float]) -> float:
    """Least-squares slope q of ``log ||grad L||`` against ``log L`` (``||grad L|| ~ L^q``).

    ``||grad L|| >= c L`` along a run where L -> 0 holds with one c > 0 when q <= 1; q > 1
    means ``||grad L|| / L -> 0``. nan with fewer than 3 usable points.
    """
    lo = np.asarray(loss, np.float64)
    g = np.asarray(grad_norm, np.float64)
    ok = (lo > 0) & (g > 0) & np.isfinite(lo) & np.isfinite(g)
    if ok.sum() < 3 or np.ptp(np.log(lo[ok])) == 0:
        return float("nan")
    return float(np.polyfit(np.log(lo[ok]), np.log(g[ok]), 1)[0])


def stalled(loss: Sequence[float], target: float, *, tail: float = 0.1, rel: float = 1e-2) -> bool:
    """Whether a run stopped above ``target`` with the loss no longer falling.

    True when the last loss exceeds ``target``, the run has left its plateau
    (:func:`plateau_end` falls before the last ``tail`` share) and the loss fell by less than
    ``rel`` (relative) over that share: a stationary point above the target, not a slow
    approach (cross-entropy on separable data falls like 1 / t, i.e. by about ``tail``
    relative over that share) and not a run still on its plateau. Runs whose tail is under 5
    steps are too short to tell (False).
    """
    x = np.asarray(loss, np.float64)
    if x[-1] <= target or len(x) * tail < 5 or plateau_end(x) >= len(x) * (1 - tail):
        return False
    start = x[max(0, int(len(x) * (1 - tail)) - 1)]
    return bool(start - x[-1] < rel * start)


def pl_lojasiewicz(seeds: Sequence[dict], *, exponent_tol: float, kernel_tol: float = 1e-6) -> dict:
    """Claim 2 from per-seed numbers: ``reached`` (bool), ``stalled`` (bool), ``exponent`` (q),
    ``kernel_rel_min`` (the smallest ``lam_min / lam_max`` of the LoRA tangent kernel on
    cross-entropy's residual subspace at the logged steps after the plateau; None: not measured).

    * any seed stalled above the target: **not supported** (GD stopped short of the infimum);
    * every seed reached the target, every q <= 1 + ``exponent_tol`` and every seed's tangent
      kernel stayed nonsingular after the plateau (``kernel_rel_min > kernel_tol``, which
      bounds ``||grad L||^2 >= lam_min ||p - y||^2 / N^2``): **supported** (``||grad L|| >= c L``
      with c > 0 after the plateau, the Lojasiewicz form that makes GD reach the infimum);
    * every seed reached it but every q > 1 + ``exponent_tol``: **not supported**
      (``||grad L|| / L`` falls to 0 with L);
    * otherwise (some seeds still falling at the end of their budget, mixed exponents, a
      kernel that turned singular or was not measured, or no seeds): **inconclusive**.
    """
    qs = [s["exponent"] for s in seeds]
    ok = [q is not None and math.isfinite(q) and q <= 1 + exponent_tol for q in qs]
    bad = [q is not None and math.isfinite(q) and q > 1 + exponent_tol for q in qs]
    kernel = [s.get("kernel_rel_min") for s in seeds]
    kernel_ok = all(k is not None and math.isfinite(k) and k > kernel_tol for k in kernel)
    reached = bool(seeds) and all(s["reached"] for s in seeds)
    if any(s["stalled"] for s in seeds):
        verdict, reason = NOT_SUPPORTED, "a seed stalled above the target loss"
    elif reached and all(ok) and kernel_ok:
        verdict = SUPPORTED
        reason = "every seed reached the target with q <= 1 + tol and a nonsingular kernel"
    elif reached and all(bad):
        verdict, reason = NOT_SUPPORTED, "||grad L|| / L falls to 0 on every seed"
    elif reached and all(ok):
        verdict = INCONCLUSIVE
        reason = "q <= 1 + tol, but the tangent kernel was singular or not measured on a seed"
    else:
        verdict, reason = INCONCLUSIVE, "some seeds short of the target or mixed exponents"
    return {"verdict": verdict, "reason": reason}


def squared_error_threshold(regimes: Sequence[dict], *, zero_tol: float) -> bool | None:
    """Do the squared-error controls show the threshold at ``dim = KN``?

    Each regime is a problem solved to convergence (Levenberg-Marquardt) with ``dim``
    (manifold dimension of the adapted matrices at its rank), ``kn`` and ``loss_start`` /
    ``loss_end``. It *fits* when ``loss_end <= zero_tol * loss_start``. True when every regime
    with ``dim > kn`` fits and every one with ``dim < kn`` does not; False when one disagrees;
    None without a regime on each side.
    """
    above = [r for r in regimes if r["dim"] > r["kn"]]
    below = [r for r in regimes if r["dim"] < r["kn"]]
    if not above or not below:
        return None

    def fits(r):
        return r["loss_end"] <= zero_tol * r["loss_start"]

    return all(fits(r) for r in above) and not any(fits(r) for r in below)


def pl_contrast(threshold_shown: bool | None, ce_below: dict | None) -> dict:
    """Claim 2 where squared error has a threshold: cross-entropy at the same rank below it.

    ``ce_below``: ``reached`` (bool), ``stalled`` (bool) and ``separated`` (the update's own
    outputs classify every training example, so L* = 0) of the cross-entropy run on the
    problem with ``dim < KN``.

    * the controls do not show the squared-error threshold (``threshold_shown`` False or
      None), or no cross-entropy run there: **inconclusive** (no threshold to be absent);
    * cross-entropy reached the target there: **supported**;
    * it stalled above the target although the data were separated (L* = 0): **not supported**;
    * otherwise (still falling, or not separated so L* > 0 is unknown): **inconclusive**.
    """
    if not threshold_shown or ce_below is None:
        why = "no squared-error threshold shown" if ce_below is not None else "not run"
        return {"verdict": INCONCLUSIVE, "reason": why}
    if ce_below["reached"]:
        return {"verdict": SUPPORTED, "reason": "cross-entropy reached the target below KN"}
    if ce_below["stalled"] and ce_below["separated"]:
        why = "cross-entropy stalled below KN on separated data"
        return {"verdict": NOT_SUPPORTED, "reason": why}
    why = "cross-entropy short of the target below KN (still falling, or L* unknown)"
    return {"verdict": INCONCLUSIVE, "reason": why}


# --- claim 3 ---------------------------------------------------------------------------------


def bias_variance_task(
    k: int, fit_drop: float, *, saturation: float, bound_min: float, loss_bound: float,
    bound_argmin: int,
) -> dict:  # fmt: skip
    """Claim 3 on one task.

    The bias is *saturated* when the training-loss floor falls by at most ``saturation`` from
    r = 1 to the largest rank (``fit_drop``). The claim: saturated for K = 2, not for K > 2.

    * saturation disagrees with the claim: **not supported**;
    * it agrees and the bound is vacuous (its smallest value ``bound_min`` exceeds the loss
      range ``loss_bound``, so it says nothing about test loss): **inconclusive**;
    * it agrees and the non-vacuous bound is lowest at r = 1 for K = 2 / above 1 for K > 2:
      **supported**, else **not supported**.

    Returns:
      ``verdict``, ``saturated``, ``vacuous`` and ``vacuous_by`` (``bound_min / loss_bound``:
      how many times too large the bound is).
    """
    saturated = fit_drop <= saturation
    vacuous = bound_min > loss_bound
    out = {"saturated": saturated, "vacuous": vacuous, "vacuous_by": bound_min / loss_bound}
    if saturated != (k == 2):
        return {**out, "verdict": NOT_SUPPORTED}
    if vacuous:
        return {**out, "verdict": INCONCLUSIVE}
    agree = (bound_argmin == 1) == (k == 2)
    return {**out, "verdict": SUPPORTED if agree else NOT_SUPPORTED}


# --- claim 4 ---------------------------------------------------------------------------------


def rank_comparison(
    by_rank: dict[int, dict[int, float]],
    *,
    multiclass: bool,
    margin: float,
    compare_rank: int,
    alpha: float = 1 - stats.LEVEL,
) -> dict:
    """Rank 1 against ``compare_rank`` (fixed in advance, not the best of the same seeds).

    ``d_s = 100 (acc(r = 1, s) - acc(compare_rank, s))`` points over the seeds both ran.

    * binary (the claim: rank 1 is competitive): TOST of ``|mean d| < margin`` at ``alpha``
      (:func:`experiments.stats.equivalence_test`): equivalent, or rank 1 better by more than
      the margin: **supported**; rank 1 worse by more than the margin: **not supported**;
      otherwise (the ``1 - 2 alpha`` interval straddles a margin): **inconclusive**.
    * multi-class (the claim: the best rank is above 1): a significant rise with rank, the
      one-sided t test of ``mean d < 0`` at ``alpha``: **supported**; equivalent within the
      margin, or rank 1 significantly better: **not supported**; otherwise **inconclusive**.
    * fewer than 2 paired seeds, or rank 1 or ``compare_rank`` not run: **inconclusive**.

    Args:
      by_rank: rank -> seed -> test accuracy (a fraction).
      multiclass: the task has more than two classes.
      margin: equivalence margin in accuracy points (> 0).
      compare_rank: the rank rank 1 is compared with.
      alpha: level of each one-sided test.

    Returns:
      ``verdict``, ``reason``, ``n``, ``diff`` (mean d, points), ``low`` / ``high`` (its
      ``1 - 2 alpha`` interval), ``p_tost``, ``p_rise`` and ``compare_rank``.
    """
    nan = float("nan")
    out = {"compare_rank": compare_rank, "n": 0, "diff": nan, "low": nan, "high": nan,
           "p_tost": nan, "p_rise": nan}  # fmt: skip
    a, b = by_rank.get(1) or {}, by_rank.get(compare_rank) or {}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        why = f"{len(seeds)} seed(s) with both r = 1 and r = {compare_rank}; needs 2"
        return {**out, "n": len(seeds), "verdict": INCONCLUSIVE, "reason": why}
    d = [100.0 * (a[s] - b[s]) for s in seeds]
    eq = stats.equivalence_test(d, margin, alpha=alpha)
    p_rise = stats.one_sided_p(d, 0.0, greater=False)
    p_fall = stats.one_sided_p(d, 0.0, greater=True)
    out.update(n=eq.n, diff=eq.diff, low=eq.low, high=eq.high, p_tost=eq.p, p_rise=p_rise)
    within = f"within ±{margin:g} points of r = {compare_rank} (TOST p = {eq.p:.3g})"
    if not multiclass:
        if eq.equivalent:
            verdict, reason = SUPPORTED, f"r = 1 is {within}"
        elif eq.better:
            verdict, reason = SUPPORTED, f"r = 1 beats r = {compare_rank} by more than {margin:g}"
        elif eq.worse:
            verdict = NOT_SUPPORTED
            reason = f"r = 1 is worse than r = {compare_rank} by more than {margin:g} points"
        else:
            verdict = INCONCLUSIVE
            reason = f"the interval [{eq.low:.1f}, {eq.high:.1f}] crosses a margin of ±{margin:g}"
    elif p_rise < alpha:
        verdict = SUPPORTED
        reason = f"accuracy rises from r = 1 to r = {compare_rank} (p = {p_rise:.3g})"
    elif eq.equivalent or p_fall < alpha:
        verdict = NOT_SUPPORTED
        reason = f"r = 1 is {within}" if eq.equivalent else f"r = 1 beats r = {compare_rank}"
    else:
        verdict, reason = INCONCLUSIVE, f"no significant rise (p = {p_rise:.3g}), no equivalence"
    return {**out, "verdict": verdict, "reason": reason}
