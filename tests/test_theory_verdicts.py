"""experiments.verdicts: every branch of every claim's verdict reached by a synthetic case.

Oracles: numbers built by hand so that the branch is known (intervals that do or do not hold
1.35, loss curves with a known plateau and a known exponent, paired accuracies whose t
statistics follow the df 2 closed form ``P(T_2 >= t) = (1 - t / sqrt(2 + t^2)) / 2``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import verdicts as v

S, N, I = v.SUPPORTED, v.NOT_SUPPORTED, v.INCONCLUSIVE


def test_combine():
    assert v.combine([S, S]) == S
    assert v.combine([S, I]) == I
    assert v.combine([I, N, S]) == N
    assert v.combine([]) == I


# --- claim 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interval, verdict",
    [
        ((1.2, 1.5), S),  # dim / KN = 2047 / 64 = 31.98 above the whole interval
        ((32.5, 40.0), N),  # the whole interval above 31.98: rank 1 fails for every C* in it
        ((30.0, 33.0), I),  # 31.98 inside
        ((1.2, float("nan")), I),  # no upper bound: C* could be anything above 1.2
        (None, I),
        ((float("nan"), 1.5), S),  # the decisive bound (high) is defined
    ],
)
def test_rank_one_conclusion_branches(interval, verdict):
    out = v.rank_one_conclusion(2047, 64, interval)
    assert out["c_max"] == pytest.approx(2047 / 64)
    assert out["verdict"] == verdict


def test_rank_one_conclusion_boundary():
    # dim / KN = 2; a C* of exactly 2 fails the strict inequality dim > C* KN.
    assert v.rank_one_conclusion(128, 64, (1.0, 1.999))["verdict"] == S
    assert v.rank_one_conclusion(128, 64, (2.0, 3.0))["verdict"] == N


@pytest.mark.parametrize(
    "intervals, verdict",
    [
        ({"a": (1.2, 1.5), "b": (1.3, 1.4)}, S),
        ({"a": (0.9, 1.1), "b": (1.5, 1.8)}, N),
        ({"a": (1.2, 1.5), "b": (1.5, 1.8)}, I),
        # An undefined interval never counts as excluding 1.35.
        ({"a": (0.9, 1.1), "b": (1.0, float("nan"))}, I),
        ({"a": (0.9, 1.1), "b": None}, I),
        ({"a": (float("nan"), float("nan"))}, I),
        ({}, I),
    ],
)
def test_cstar_constant_branches(intervals, verdict):
    out = v.cstar_constant(intervals, 1.35)
    assert out["verdict"] == verdict
    assert sorted(out["inside"] + out["outside"] + out["undefined"]) == sorted(intervals)


@pytest.mark.parametrize(
    "counts, dim, kn, fits, verdict",
    [
        ({"global minimum": 20}, 3068, 64, True, S),
        ({"global minimum": 19, "spurious minimum": 1}, 3068, 64, True, N),
        ({"global minimum": 19, "saddle": 1}, 3068, 64, True, I),
        ({"global minimum": 19, "not stationary": 1}, 3068, 64, True, I),
        ({"global minimum": 20}, 3068, 64, False, I),  # no start interpolates
        ({"global minimum": 20}, 767, 1024, True, I),  # below the count
        ({"spurious minimum": 3}, 767, 1024, True, I),  # allowed there
        ({}, 3068, 64, True, I),
    ],
)
def test_no_spurious_minima_branches(counts, dim, kn, fits, verdict):
    assert v.no_spurious_minima(counts, dim=dim, kn=kn, fits=fits)["verdict"] == verdict


@pytest.mark.parametrize(
    "errors, verdict",
    [([0.01, 0.05], S), ([0.2, 1.3], N), ([0.05, 0.2], I), ([], I), ([0.1], S)],
)
def test_ntk_regime_branches(errors, verdict):
    assert v.ntk_regime(errors, tol=0.1)["verdict"] == verdict


# --- claim 2 ---------------------------------------------------------------------------------


def _plateau_curve(plateau=200, steps=1000, q=1.0):
    """A loss flat at log 2 for ``plateau`` steps, then falling like 1 / t; its gradient norm
    is ``0.8 L^q`` (q = 1: the Lojasiewicz form with c = 0.8)."""
    t = np.arange(steps + 1, dtype=np.float64)
    loss = np.where(
        t < plateau,
        math.log(2) * (1 - 1e-4 * t),
        math.log(2) * (1 - 1e-4 * plateau) / (1 + 0.5 * np.maximum(t - plateau, 0)),
    )
    return loss, 0.8 * loss**q


def test_plateau_end_finds_the_escape_not_a_constant():
    for plateau in (50, 200, 400):
        loss, _ = _plateau_curve(plateau)
        assert plateau <= v.plateau_end(loss) <= plateau + 5
    # No plateau: steepest at the start.
    assert v.plateau_end(1 / (1 + np.arange(100.0))) == 5


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_lojasiewicz_exponent_recovers_a_planted_power(q):
    loss, grad = _plateau_curve(q=q)
    start = v.plateau_end(loss)
    assert v.lojasiewicz_exponent(loss[start:], grad[start:]) == pytest.approx(q, abs=1e-9)
    assert math.isnan(v.lojasiewicz_exponent([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_stalled_tells_a_stationary_point_from_a_slow_approach():
    slow, _ = _plateau_curve(steps=1000)  # 1 / t: about 10% down over the last 10%
    assert not v.stalled(slow, 1e-6)
    assert not v.stalled(slow, 1.0)  # reached
    stuck = np.concatenate([np.linspace(0.7, 0.3, 500), np.full(501, 0.3)])
    assert v.stalled(stuck, 1e-3)
    assert not v.stalled(stuck, 0.3)  # stopped exactly at the target: reached ("at most")
    # Still on the plateau at the end of the budget (the escape would come at step 250):
    # slow, not stalled.
    on_plateau, _ = _plateau_curve(plateau=250, steps=200)
    assert v.plateau_end(on_plateau) >= 190 and not v.stalled(on_plateau, 1e-3)
    assert not v.stalled(np.full(30, 0.7), 1e-3)  # a 3-step tail: too short to tell


@pytest.mark.parametrize(
    "seeds, verdict",
    [
        ([{"reached": True, "stalled": False, "exponent": 1.0, "kernel_rel_min": 0.1}] * 3, S),
        ([{"reached": True, "stalled": False, "exponent": 0.7, "kernel_rel_min": 0.1}] * 2, S),
        ([{"reached": True, "stalled": False, "exponent": 1.5, "kernel_rel_min": 0.1}] * 2, N),
        (
            [
                {"reached": True, "stalled": False, "exponent": 1.0, "kernel_rel_min": 0.1},
                {"reached": False, "stalled": True, "exponent": 1.0, "kernel_rel_min": 0.1},
            ],
            N,
        ),
        (
            [
                {"reached": True, "stalled": False, "exponent": 1.0, "kernel_rel_min": 0.1},
                {"reached": False, "stalled": False, "exponent": 1.0, "kernel_rel_min": 0.1},
            ],
            I,
        ),
        (
            [
                {"reached": True, "stalled": False, "exponent": 1.0, "kernel_rel_min": 0.1},
                {"reached": True, "stalled": False, "exponent": 1.5, "kernel_rel_min": 0.1},
            ],
            I,
        ),
        ([{"reached": True, "stalled": False, "exponent": float("nan")}], I),
        ([], I),
        # q <= 1 but the tangent kernel turned singular after the plateau, or was not measured.
        ([{"reached": True, "stalled": False, "exponent": 1.0, "kernel_rel_min": 1e-9}], I),
        ([{"reached": True, "stalled": False, "exponent": 1.0, "kernel_rel_min": None}], I),
        ([{"reached": True, "stalled": False, "exponent": 1.0}], I),
    ],
)
def test_pl_lojasiewicz_branches(seeds, verdict):
    assert v.pl_lojasiewicz(seeds, exponent_tol=0.1)["verdict"] == verdict


def test_pl_lojasiewicz_from_curves_end_to_end():
    # The numbers a run would give: q measured after the detected plateau.
    def seed(q, steps=1000, target=1e-3):
        loss, grad = _plateau_curve(steps=steps, q=q)
        s = v.plateau_end(loss)
        return {
            "reached": bool(loss[-1] <= target),
            "stalled": v.stalled(loss, target),
            "exponent": v.lojasiewicz_exponent(loss[s:], grad[s:]),
            "kernel_rel_min": 0.05,
        }

    assert v.pl_lojasiewicz([seed(1.0, steps=2000)], exponent_tol=0.1)["verdict"] == S
    assert v.pl_lojasiewicz([seed(2.0, steps=2000)], exponent_tol=0.1)["verdict"] == N
    assert v.pl_lojasiewicz([seed(1.0, steps=1000)], exponent_tol=0.1)["verdict"] == I


def _regime(dim, kn, end, start=1.0):
    return {"dim": dim, "kn": kn, "loss_start": start, "loss_end": end}


@pytest.mark.parametrize(
    "regimes, shown",
    [
        ([_regime(3068, 64, 1e-7), _regime(767, 1024, 0.2), _regime(1532, 1024, 1e-6)], True),
        ([_regime(3068, 64, 1e-7), _regime(767, 1024, 1e-6)], False),  # fits below KN too
        ([_regime(3068, 64, 0.1), _regime(767, 1024, 0.2)], False),  # misses above KN
        ([_regime(3068, 64, 1e-7)], None),  # no regime below KN
        ([_regime(767, 1024, 0.2)], None),
        # the tolerance is relative to the start: 1e-5 of a start of 100 is a fit (1e-4 tol)
        ([_regime(3068, 64, 1e-3, start=100.0), _regime(767, 1024, 0.2)], True),
    ],
)
def test_squared_error_threshold(regimes, shown):
    assert v.squared_error_threshold(regimes, zero_tol=1e-4) is shown


@pytest.mark.parametrize(
    "shown, ce, verdict",
    [
        (True, {"reached": True, "stalled": False, "separated": True}, S),
        (True, {"reached": False, "stalled": True, "separated": True}, N),
        (True, {"reached": False, "stalled": True, "separated": False}, I),  # L* unknown
        (True, {"reached": False, "stalled": False, "separated": True}, I),  # still falling
        (False, {"reached": True, "stalled": False, "separated": True}, I),  # no threshold
        (None, {"reached": True, "stalled": False, "separated": True}, I),
        (True, None, I),
    ],
)
def test_pl_contrast_branches(shown, ce, verdict):
    assert v.pl_contrast(shown, ce)["verdict"] == verdict


# --- claim 3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, drop, bound_min, argmin, verdict, vacuous",
    [
        (2, 0.001, 0.8, 1, S, False),  # saturated, non-vacuous, argmin 1
        (2, 0.001, 0.8, 4, N, False),  # saturated but the bound wants r = 4
        (2, 0.3, 0.8, 1, N, False),  # binary but the fit keeps falling
        (2, 0.001, 18.0, 1, I, True),  # saturated, but the bound is vacuous (18 x too large)
        (6, 0.3, 0.9, 4, S, False),  # multi-class: falls, argmin above 1
        (6, 0.3, 0.9, 1, N, False),
        (6, 0.001, 0.9, 4, N, False),  # multi-class but saturated at r = 1
        (6, 0.3, 50.0, 1, I, True),
    ],
)
def test_bias_variance_task_branches(k, drop, bound_min, argmin, verdict, vacuous):
    out = v.bias_variance_task(
        k, drop, saturation=0.01, bound_min=bound_min, loss_bound=1.0, bound_argmin=argmin
    )
    assert out["verdict"] == verdict
    assert out["vacuous"] == vacuous and out["vacuous_by"] == pytest.approx(bound_min)


# --- claim 4 ---------------------------------------------------------------------------------

SEEDS = (13, 21, 42, 87, 100)


def _by_rank(**ranks):
    """rank -> seed -> accuracy from ``r1=[...]``, ``r12=[...]`` (in %)."""
    return {
        int(k[1:]): {s: a / 100 for s, a in zip(SEEDS, acc, strict=False)}
        for k, acc in ranks.items()
    }


def sf_df2(t):
    return 0.5 * (1 - t / math.sqrt(2 + t * t))


@pytest.mark.parametrize(
    "ranks, multiclass, verdict",
    [
        # binary, d = (-1, 0, 1) + x with x = 0: 90% interval 0 ± 1.686 inside ±2: equivalent.
        ({"r1": [79, 80, 81], "r12": [80, 80, 80]}, False, S),
        # binary, d = (-11, -10, -9): worse by more than 2 points.
        ({"r1": [69, 70, 71], "r12": [80, 80, 80]}, False, N),
        # binary, d = (-10, 0, 10): mean 0 but too noisy for equivalence (low power).
        ({"r1": [70, 80, 90], "r12": [80, 80, 80]}, False, I),
        # binary, rank 1 beats r = 12 by 10 points: competitive.
        ({"r1": [89, 90, 91], "r12": [80, 80, 80]}, False, S),
        # multi-class: a significant rise (d = -11, -10, -9).
        ({"r1": [69, 70, 71], "r12": [80, 80, 80]}, True, S),
        # multi-class: equivalent within 2 points: no rise.
        ({"r1": [79, 80, 81], "r12": [80, 80, 80]}, True, N),
        # multi-class: rank 1 significantly better.
        ({"r1": [89, 90, 91], "r12": [80, 80, 80]}, True, N),
        # multi-class: too noisy.
        ({"r1": [70, 80, 90], "r12": [80, 80, 80]}, True, I),
        # one seed, or no rank 12: nothing to test.
        ({"r1": [60], "r12": [80]}, True, I),
        ({"r1": [60, 61, 62], "r4": [80, 80, 80]}, True, I),
    ],
)
def test_rank_comparison_branches(ranks, multiclass, verdict):
    out = v.rank_comparison(_by_rank(**ranks), multiclass=multiclass, margin=2.0, compare_rank=12)
    assert out["verdict"] == verdict, out["reason"]


def test_rank_comparison_numbers_by_hand_and_no_best_of_seeds_rival():
    # r = 4 is far better than r = 12 on these seeds; the comparison stays with r = 12.
    by_rank = _by_rank(r1=[79, 80, 81], r4=[95, 95, 95], r12=[80, 80, 80])
    out = v.rank_comparison(by_rank, multiclass=False, margin=2.0, compare_rank=12)
    assert out["compare_rank"] == 12 and out["n"] == 3 and out["verdict"] == S
    # d = (-1, 0, 1): mean 0, se 1 / sqrt 3; p_lower = P(T_2 >= 2 sqrt 3).
    assert out["diff"] == pytest.approx(0.0, abs=1e-9)
    assert out["p_tost"] == pytest.approx(sf_df2(2 * math.sqrt(3)), rel=1e-6)
    assert out["p_rise"] == pytest.approx(0.5, abs=1e-9)
    half = 0.9 / math.sqrt(2 * 0.95 * 0.05) / math.sqrt(3)  # t_{0.95, 2} se
    assert (out["low"], out["high"]) == (pytest.approx(-half), pytest.approx(half))
    # Only the seeds both ranks ran are paired.
    partial = _by_rank(r1=[70, 71, 99, 99], r12=[80, 80])
    out = v.rank_comparison(partial, multiclass=True, margin=2.0, compare_rank=12)
    assert out["n"] == 2 and out["diff"] == pytest.approx(-9.5)


@pytest.mark.parametrize("x, verdict", [(0.31, S), (0.32, I)])
def test_rank_comparison_equivalence_edge_is_the_t_quantile(x, verdict):
    # d = (x - 1, x, x + 1) points: equivalent iff x < 2 - t_{0.95, 2} / sqrt 3 = 0.31414.
    r1 = [80 + x - 1, 80 + x, 80 + x + 1]
    out = v.rank_comparison(
        _by_rank(r1=r1, r12=[80, 80, 80]), multiclass=False, margin=2.0, compare_rank=12
    )
    assert out["verdict"] == verdict, out["reason"]


@pytest.mark.parametrize("x, verdict", [(1.68, I), (1.69, S)])
def test_rank_comparison_rise_edge_is_the_one_sided_t_quantile(x, verdict):
    # d = (-x - 1, -x, -x + 1): t = -x sqrt 3; a rise at 5% one-sided needs x sqrt 3 >
    # t_{0.95, 2} = 0.9 / sqrt(0.095) = 2.91999, i.e. x > 1.68586.
    assert 0.9 / math.sqrt(0.095) / math.sqrt(3) == pytest.approx(1.68586, abs=1e-5)
    r1 = [80 - x - 1, 80 - x, 80 - x + 1]
    out = v.rank_comparison(
        _by_rank(r1=r1, r12=[80, 80, 80]), multiclass=True, margin=2.0, compare_rank=12
    )
    assert out["p_rise"] == pytest.approx(sf_df2(x * math.sqrt(3)), rel=1e-6)
    assert out["verdict"] == verdict, out["reason"]


@pytest.mark.parametrize("bound_min, verdict", [(0.99, S), (1.01, I)])
def test_bias_variance_vacuous_edge_is_the_loss_range(bound_min, verdict):
    out = v.bias_variance_task(
        2, 0.0, saturation=0.01, bound_min=bound_min, loss_bound=1.0, bound_argmin=1
    )
    assert out["verdict"] == verdict
