"""ntk.theory.cstar: the simulation recovers the exact transition of full-rank least squares."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ntk.theory import cstar


@pytest.mark.parametrize("solver", ["lstsq", "lm"])
def test_full_rank_least_squares_transition_is_exactly_rho_one(solver):
    # r = min(m, n): the factorization expresses every 4 x 3 matrix, rho = 12 / KN, and
    # interpolation of generic targets is possible exactly when 12 unknowns >= KN equations.
    m, n, r = 4, 3, 3
    kns = list(range(16, 7, -1))
    with jax.enable_x64():
        points = [
            cstar.simulate(
                0, m, n, r, kn, solver=solver, draws=24, budgets=(200,), kn_max=16, dtype=np.float64
            )
            for kn in kns
        ]
    success = np.array([p.ratios[:, -1] < 1e-10 for p in points])
    rhos = np.array([p.rho for p in points])
    assert success[rhos >= 1].all() and not success[rhos < 1].any()
    t = cstar.transition(rhos, success, n_boot=50)
    assert 12 / 13 <= t.low <= t.rho50 <= t.high <= 1.0 and t.censored == ""


def test_transition_of_a_known_curve_and_censoring():
    rhos = np.array([0.8, 1.0, 1.2, 1.4])
    # 0%, 25%, 75%, 100% of 8 draws: the 50% crossing is halfway between 1.0 and 1.2.
    success = np.array([[0] * 8, [1] * 2 + [0] * 6, [1] * 6 + [0] * 2, [1] * 8], bool)
    t = cstar.transition(rhos, success, n_boot=200)
    assert t.rho50 == pytest.approx(1.1) and t.low < 1.1 < t.high
    never = cstar.transition(rhos, np.zeros((4, 8), bool), n_boot=20)
    assert np.isnan(never.rho50) and never.censored == "above-grid"
    # A non-monotone curve is first made monotone (pool adjacent violators).
    np.testing.assert_allclose(cstar.isotonic([0.0, 0.5, 0.3, 1.0], [1, 1, 1, 1]), [0, 0.4, 0.4, 1])


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="lstsq"):
        cstar.simulate(0, 4, 3, 2, 5, solver="lstsq")
    with pytest.raises(ValueError, match="budgets"):
        cstar.simulate(0, 4, 3, 2, 5, budgets=(10, 5))
    with pytest.raises(ValueError, match="kn_max"):
        cstar.simulate(0, 4, 3, 2, 5, kn_max=4)
