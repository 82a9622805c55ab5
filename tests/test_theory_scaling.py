"""ntk.theory.scaling: limits of transition points against closed forms built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ntk.theory import scaling

BUDGETS = np.array([1250, 2500, 5000, 10000, 20000])


def test_power_law_fit_recovers_a_known_limit_and_exponent():
    y = 1.2 + 3.0 * BUDGETS**-0.5  # falls towards 1.2
    y_inf, a, b, reason = scaling.power_law_fit(BUDGETS, y, b_grid=np.array([0.25, 0.5, 1.0]))
    assert reason == "" and (y_inf, a, b) == pytest.approx((1.2, 3.0, 0.5))
    y_inf, _, b, _ = scaling.power_law_fit(BUDGETS, y)  # the default grid brackets 0.5
    assert y_inf == pytest.approx(1.2, abs=2e-3) and b == pytest.approx(0.5, rel=0.05)
    # Rising points (a < 0) have their limit above them.
    assert scaling.power_law_fit(BUDGETS, 2.0 - BUDGETS**-0.3)[0] == pytest.approx(2.0, abs=1e-3)


def test_power_law_fit_undefined_cases():
    # Still falling like log T: no limit.
    y_inf, _, _, reason = scaling.power_law_fit(BUDGETS, 2.0 - 0.1 * np.log(BUDGETS))
    assert np.isnan(y_inf) and "no limit" in reason
    y_inf, *_, reason = scaling.power_law_fit(BUDGETS[:2], [1.5, 1.4])
    assert np.isnan(y_inf) and "too few" in reason
    # b fixed at 1 (a / x): two points determine the line in 1 / x, and no "no limit".
    y_inf, a, b, reason = scaling.power_law_fit([10, 20], [1.2, 1.1], b_grid=np.array([1.0]))
    assert (y_inf, a, b) == pytest.approx((1.0, 2.0, 1.0)) and reason == ""
    # nan points are dropped (3 finite left); constant points are their own limit.
    assert scaling.power_law_fit(BUDGETS, [np.nan, np.nan, 1.3, 1.3, 1.3])[:2] == (1.3, 0.0)


def test_bootstrap_crossings_are_paired_and_censored():
    rhos = np.array([0.8, 1.0, 1.2, 1.4])
    # budget 0: 0, 2, 6, 8 of 8 succeed (50% at 1.1); budget 1: 0, 6, 8, 8 (50% at
    # 0.8 + 0.5 / 0.75 * 0.2 = 0.9333); budget 2: every draw succeeds from the first point:
    # censored below the grid (nan).
    counts = [[0, 2, 6, 8], [0, 6, 8, 8], [8, 8, 8, 8]]
    success = np.zeros((4, 3, 8), bool)
    for b, row in enumerate(counts):
        for g, c in enumerate(row):
            success[g, b, :c] = True
    est, boots = scaling.bootstrap_crossings(rhos, success, level=0.5, n_boot=40)
    np.testing.assert_allclose(est[:2], [1.1, 0.8 + 0.2 * 0.5 / 0.75])
    assert np.isnan(est[2]) and np.isnan(boots[:, 2]).all()
    assert boots.shape == (40, 3) and np.isfinite(boots[:, :2]).all()
    # Paired: success at budget 1 contains budget 0's draws, so every resample's crossing
    # at budget 1 is at most its crossing at budget 0.
    assert np.all(boots[:, 1] <= boots[:, 0] + 1e-12)


def test_extrapolate_interval_holds_the_grid_cell_and_is_undefined_past_the_grid():
    y = 1.2 + 3.0 * BUDGETS**-0.5
    boots = np.tile(y, (50, 1))  # a sharp step: every resample gives the same points
    grid = np.array([0.9, 1.1, 1.3, 1.5])
    out = scaling.extrapolate(BUDGETS, y, boots, grid=grid)
    assert out.value == pytest.approx(1.2, abs=2e-3) and (out.low, out.high) == (1.1, 1.3)
    # Noisy resamples around the curve: the interval holds the truth and the cell.
    rng = np.random.default_rng(0)
    noisy = y + 0.002 * rng.standard_normal((200, BUDGETS.size))
    out = scaling.extrapolate(BUDGETS, y, noisy, grid=grid)
    assert out.low <= 1.1 and out.high >= 1.3 and out.reason == ""
    # A limit below the grid: no lower bound.
    low = scaling.extrapolate(BUDGETS, y - 0.5, boots - 0.5, grid=grid)
    assert low.reason == "below the grid" and np.isnan(low.low) and low.high >= 0.9
    # Resamples that lose a crossing the estimate has: too many undefined, no interval.
    lost = boots.copy()
    lost[:10, 0] = np.nan
    out = scaling.extrapolate(BUDGETS, y, lost, grid=grid)
    assert np.isfinite(out.value) and np.isnan(out.low) and np.isnan(out.high)
    assert "resamples" in out.reason
    # An undefined limit has no interval.
    out = scaling.extrapolate(BUDGETS, 2 - 0.1 * np.log(BUDGETS), boots, grid=grid)
    assert np.isnan([out.value, out.low, out.high]).all() and "no limit" in out.reason


def test_resamples_without_a_limit_leave_the_falling_side_unbounded():
    y = 1.2 + 3.0 * BUDGETS**-0.5
    boots = np.tile(y, (40, 1))
    boots[:5] = 2.0 - 0.1 * np.log(BUDGETS)  # 12% of resamples still fall like log T
    out = scaling.extrapolate(BUDGETS, y, boots, grid=np.array([0.9, 1.1, 1.3, 1.5]))
    assert np.isnan(out.low) and out.high == 1.3 and "unbounded" in out.reason
