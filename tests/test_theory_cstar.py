"""ntk.theory.cstar: the simulation recovers the exact transition of full-rank least squares."""

from __future__ import annotations

import json

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


def test_a_sharp_step_gives_its_grid_cell_not_a_zero_width_interval():
    rhos = np.array([0.8, 1.0, 1.2, 1.4])
    step = np.array([[0] * 8, [0] * 8, [1] * 8, [1] * 8], bool)  # every resample crosses at 1.1
    t = cstar.transition(rhos, step, n_boot=50)
    assert t.rho50 == pytest.approx(1.1) and (t.low, t.high) == (1.0, 1.2)
    # Success from the first grid point on: the transition lies somewhere below the grid.
    below = cstar.transition(rhos, np.ones((4, 8), bool), n_boot=20)
    assert below.censored == "below-grid" and np.isnan(below.low) and below.high == 0.8
    never = cstar.transition(rhos, np.zeros((4, 8), bool), n_boot=20)
    assert np.isnan(never.low) and np.isnan(never.high)


def _problem(m=4, n=3, r=1, kn=5, seed=3):
    a, y, u, v = cstar._draws(seed, 1, kn, kn, m, n, r, 0.5, np.dtype(np.float64))
    return a[0], y[0], u[0], v[0]


def _grads(a, y, u, v):
    """By hand: res = A vec(U V^T) - y, S = sum_i res_i A_i; dL/dU = S V, dL/dV = S^T U."""
    m, n = u.shape[0], v.shape[0]
    res = a @ (u @ v.T).reshape(-1) - y
    s = (res @ a).reshape(m, n)
    return 0.5 * res @ res, s @ v, s.T @ u


@pytest.mark.parametrize("steps", [1, 3])
def test_gd_takes_the_hand_computed_steps(steps):
    a, y, u0, v0 = _problem()
    u, v = u0.copy(), v0.copy()
    for _ in range(steps):  # numpy GD, the gradient by hand
        _, gu, gv = _grads(a, y, u, v)
        u, v = u - 0.1 * gu, v - 0.1 * gv
    expected = _grads(a, y, u, v)[0] / _grads(a, y, u0, v0)[0]
    with jax.enable_x64():
        got = cstar._simulate_jit(a[None], y[None], u0[None], v0[None], cstar.Solver.GD,
                                  (steps,), 0.1)  # fmt: skip
    assert float(got[0, 0]) == pytest.approx(expected, rel=1e-9)
    assert expected < 1  # small steps go down


def test_adam_first_steps_by_hand():
    # Adam (b1 0.9, b2 0.999, eps 1e-8) with the cosine-decayed step lr_t = lr (alpha + (1 -
    # alpha)(1 + cos(pi t / T)) / 2), alpha = 1e-3, T = the largest budget.
    a, y, u0, v0 = _problem()
    lr, total = 0.05, 4
    u, v = u0.copy(), v0.copy()
    mu = [np.zeros_like(u), np.zeros_like(v)]
    nu = [np.zeros_like(u), np.zeros_like(v)]
    for t in range(1, total + 1):
        _, gu, gv = _grads(a, y, u, v)
        step = lr * (1e-3 + (1 - 1e-3) * 0.5 * (1 + np.cos(np.pi * (t - 1) / total)))
        new = []
        for i, (x, g) in enumerate(((u, gu), (v, gv))):
            mu[i] = 0.9 * mu[i] + 0.1 * g
            nu[i] = 0.999 * nu[i] + 0.001 * g * g
            mhat, vhat = mu[i] / (1 - 0.9**t), nu[i] / (1 - 0.999**t)
            new.append(x - step * mhat / (np.sqrt(vhat) + 1e-8))
        u, v = new
    expected = _grads(a, y, u, v)[0] / _grads(a, y, u0, v0)[0]
    with jax.enable_x64():
        got = cstar._simulate_jit(a[None], y[None], u0[None], v0[None], cstar.Solver.ADAM,
                                  (total,), lr)  # fmt: skip
    assert float(got[0, 0]) == pytest.approx(expected, rel=1e-7)


def test_gd_solves_an_easy_problem_and_its_budgets_are_nested():
    # rho = 6 / 3 = 2 (r = 1, 4 x 3, KN = 3): GD from a small init reaches a near-zero loss,
    # and the losses at increasing budgets fall.
    with jax.enable_x64():
        p = cstar.simulate(0, 4, 3, 1, 3, solver="gd", draws=8, budgets=(50, 2000, 8000),
                           lr=0.2, dtype=np.float64)  # fmt: skip
    assert np.all(np.diff(p.ratios, axis=1) <= 1e-12)
    assert np.median(p.ratios[:, -1]) < 1e-6


def test_failure_counts_by_hand():
    gd = np.array([1e-6, 0.5, 0.5, np.inf, 1e-3])
    restart = np.array([0.0, 1e-7, 0.3, 1e-9, np.inf])
    assert cstar.failure_counts(gd, restart, 1e-4) == {"solved": 1, "slow": 2, "stuck": 2}


def test_gd_failures_restarted_by_lm_tell_slow_from_stuck():
    # The same draws as simulate: GD's ratio after 300 steps is simulate's at budget 300.
    m, n, r = 6, 5, 1
    kn_easy = 5  # rho = 10 / 5 = 2: LM solves from anywhere generic
    point = cstar.simulate(0, m, n, r, kn_easy, solver="gd", draws=6, budgets=(300,))
    fail = cstar.classify_failures(0, m, n, r, kn_easy, draws=6, steps=300, lm_iters=100)
    np.testing.assert_allclose(fail.gd, point.ratios[:, 0], rtol=1e-4)
    assert np.all(fail.restart <= fail.gd * (1 + 1e-6))  # LM only accepts steps that lower L
    # No GD step: every draw fails GD; from the start LM solves the easy problem (slow), and
    # cannot solve one with no rank-1 solution (rho = 10 / 20 = 0.5): stuck.
    easy = cstar.classify_failures(0, m, n, r, kn_easy, draws=6, steps=0, lm_iters=100)
    assert np.all(easy.gd == 1.0)
    assert cstar.failure_counts(easy.gd, easy.restart, 1e-4) == {"solved": 0, "slow": 6,
                                                                 "stuck": 0}  # fmt: skip
    hard = cstar.classify_failures(0, m, n, r, 20, draws=6, steps=0, lm_iters=100)
    assert hard.rho == pytest.approx(0.5)
    assert cstar.failure_counts(hard.gd, hard.restart, 1e-4) == {"solved": 0, "slow": 0,
                                                                 "stuck": 6}  # fmt: skip


@pytest.mark.slow
def test_cstar_run_classifies_gds_failures(tmp_path):
    from experiments import cstar as cstar_exp

    cfg = cstar_exp.CStarConfig(shapes=("4x3x1",), solvers=("gd",), rhos=(0.8, 2.0), draws=4,
                                restart_iters=50, out=str(tmp_path))  # fmt: skip
    out = cstar_exp.run(cfg, progress=False)
    by_rho = {round(r["rho"], 2): r for r in out["failures"]}
    assert sorted(by_rho) == [0.75, 2.0]  # dim 6: KN = 8 and 3
    below = cstar.failure_counts(by_rho[0.75]["gd"], by_rho[0.75]["restart"], cfg.tol)
    assert below == {"solved": 0, "slow": 0, "stuck": 4}  # no rank-1 solution below rho = 1
    assert "| 4x3x1 | 0.750 | 8 | 0 | 0 | 4 |" in out["markdown"]
    again = cstar_exp.run(cfg, progress=False)  # resumed: nothing recomputed
    assert len((tmp_path / "cstar" / "failures.jsonl").read_text().splitlines()) == 2
    assert again["failures"] == out["failures"]


def test_transitions_report_the_95_percent_point():
    from experiments import cstar as cstar_exp

    # success 0 / 20, 10 / 20, 20 / 20 at rho 1, 1.5, 2: the 50% point is 1.5; the 95% point
    # interpolates between 1.5 (0.5) and 2 (1.0): 1.5 + 0.45 / 0.5 * 0.5 = 1.95.
    recs = [
        {"shape": "4x3x1", "solver": "lm", "rho": rho, "budgets": [300],
         "ratios": [[0.0 if d < wins else 1.0 for d in range(20)]]}
        for rho, wins in ((1.0, 0), (1.5, 10), (2.0, 20))
    ]  # fmt: skip
    (row,) = cstar_exp.transitions(recs, (1e-4,), n_boot=50)
    assert row["rho50"] == pytest.approx(1.5) and row["rho95"] == pytest.approx(1.95)
    assert row["low95"] <= 1.5 and row["high95"] >= 2.0  # the grid cell it falls in


def _gd_records(shape, wins, rhos=(1.0, 1.5, 2.0), budgets=(100, 200, 400, 800), draws=20):
    """GD records: no draw succeeds at rho 1, all at 2, ``wins[b]`` at 1.5 after budget b."""
    recs = []
    for rho in rhos:
        per = [0 if rho == 1.0 else draws if rho == 2.0 else w for w in wins]
        ratios = [[1e-9 if d < c else 1.0 for d in range(draws)] for c in per]
        recs.append({"shape": shape, "solver": "gd", "rho": rho, "budgets": list(budgets),
                     "ratios": ratios})  # fmt: skip
    return recs


def test_budget_limits_extrapolate_gds_points_and_scale_over_sizes():
    from experiments import cstar as cstar_exp
    from ntk.theory import scaling

    shapes = ("4x4x1", "8x8x1", "12x12x1")
    wins = {"4x4x1": [12, 15, 17, 18], "8x8x1": [11, 14, 16, 17], "12x12x1": [11, 13, 15, 16]}
    records = [rec for s in shapes for rec in _gd_records(s, wins[s])]
    cfg = cstar_exp.CStarConfig(shapes=shapes, solvers=("gd",), rhos=(1.0, 1.5, 2.0),
                                gd_budgets=(100, 200, 400, 800), n_boot=50)  # fmt: skip
    limits = cstar_exp.budget_limits(records, cfg)
    # 50% crossing between rho 1 (0%) and 1.5 (p): 1 + 0.5 * 0.5 / p.
    p = np.array(wins["4x4x1"]) / 20
    points = 1 + 0.25 / p
    np.testing.assert_allclose(limits["4x4x1"][0.5]["points"], points)
    lim = limits["4x4x1"][0.5]["limit"]
    assert lim["value"] == pytest.approx(scaling.power_law_fit([100, 200, 400, 800], points)[0])
    assert lim["value"] < points[-1]  # the limit lies past the longest budget's point
    sizes = cstar_exp.finite_size(limits, cfg)
    lim_of = lambda s: limits[s][0.5]["limit"]  # noqa: E731
    # GD limit, GD at 800 steps; each with b free and b = 1.
    assert [(r["dims"], r["model"]) for r in sizes] == [([7, 15, 23], "a d^-b"),
                                                        ([7, 15, 23], "a / d")] * 2  # fmt: skip
    at_800 = sizes[3]
    # b = 1: least squares of the points on 1 / d, intercept at d -> inf.
    design = np.stack([np.ones(3), 1 / np.array([7, 15, 23])], axis=1)
    expected = np.linalg.lstsq(design, np.array(at_800["points"]), rcond=None)[0][0]
    assert at_800["limit"]["value"] == pytest.approx(expected)
    np.testing.assert_allclose(at_800["points"],
                               [1 + 0.25 / (wins[s][-1] / 20) for s in shapes])  # fmt: skip
    rows = cstar_exp.transitions(records, (1e-4,), n_boot=20)
    conc = cstar_exp.conclusion(rows, 1e-4, limits, sizes)
    assert conc["finite_size"] == sizes and conc["shapes"]["8x8x1"]["gd_limit"] == lim_of("8x8x1")
    text = cstar_exp.limits_markdown(limits, sizes, cfg)
    assert "| 4x4x1 | 50% | 1.417 / 1.333 / 1.294 / 1.278 |" in text
    assert "| 1, 1 | GD at 800 steps | a / d | 7: 1.278, 15: 1.294, 23: 1.312 |" in text


def test_block_draws_take_real_entries_scaled_to_unit_spectral_norm():
    rng = np.random.default_rng(0)
    jac = rng.standard_normal((5, 2, 4, 3))  # [P, K, M, N]
    # The whole problem (every example, row and column): each draw is a permutation of it.
    a, y, u, v = cstar.block_draws(jac, 0, 3, 5, 4, 3, 1, kn_max=12, dtype=np.float64)
    assert a.shape == (3, 12, 12) and y.shape == (3, 12) and u.shape == (3, 4, 1)
    full = jac.reshape(10, 12)
    for i in range(3):
        block = a[i, :10]
        assert np.linalg.norm(block, 2) == pytest.approx(1.0)
        np.testing.assert_allclose(np.sort(block.ravel()),
                                   np.sort(full.ravel()) / np.linalg.norm(full, 2))  # fmt: skip
        assert not a[i, 10:].any() and not y[i, 10:].any()
    # A smaller block: exactly m of M rows and n of N columns of the chosen examples.
    a, *_ = cstar.block_draws(jac, 1, 2, 2, 2, 2, 1, dtype=np.float64)
    assert a.shape == (2, 4, 4)
    # r = min(m, n): exact least squares fits generic targets when mn >= KN (4 >= 4).
    ratios = cstar.solve(cstar.block_draws(jac, 2, 4, 2, 2, 2, 2, dtype=np.float64), "lstsq",
                         (1,), 0.0)  # fmt: skip
    assert ratios.shape == (4, 1) and np.all(ratios < 1e-6)
    with pytest.raises(ValueError, match="n_examples"):
        cstar.block_draws(jac, 0, 1, 6, 2, 2, 1)


def test_cstar_real_runs_on_given_jacobians_and_resumes(tmp_path, monkeypatch):
    from experiments import cstar_real

    calls = []

    def fake(cfg):  # a rank-deficient "real" operator: every example shares one direction
        calls.append(cfg)
        rng = np.random.default_rng(0)
        common = rng.standard_normal((1, 1, 6, 6))
        return (rng.standard_normal((8, 2, 6, 6)) + 3 * common).astype(np.float32)

    monkeypatch.setattr(cstar_real, "load_jacobian", fake)
    # dim 7: rho 1.75 and 0.6 give N = round(7 / 3.5) = 2 and round(7 / 1.2) = 6.
    cfg = cstar_real.RealConfig(blocks=("4x4x1",), rhos=(0.6, 1.75), pool_k=4, draws=4,
                                n_boot=20, gd_budgets=(50, 100, 200),
                                out=str(tmp_path))  # fmt: skip
    out = cstar_real.run(cfg, progress=False)
    # One record per (solver, N), rho = dim / (2 N) = 7 / 4 and 7 / 12.
    recs = [json.loads(line) for line in (tmp_path / "cstar_real" / "points.jsonl").open()]
    assert len(recs) == 4 and len(calls) == 1
    assert sorted(round(r["rho"], 4) for r in recs) == [0.5833, 0.5833, 1.75, 1.75]
    assert {r["solver"] for r in recs} == {"gd", "lm"}
    assert np.array(recs[0]["ratios"]).shape == (3, 4)  # GD: [budgets][draws]
    assert "4x4x1" in out["conclusion"]["shapes"] and out["limits"]["4x4x1"][0.5]
    assert "Real sensing matrices" in (tmp_path / "cstar_real" / "report.md").read_text()
    cstar_real.run(cfg, progress=False)  # resumed: no Jacobians, no new points
    assert len(calls) == 1
    assert len((tmp_path / "cstar_real" / "points.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="one module and one layer"):
        cstar_real.RealConfig(targets="query|value")
    with pytest.raises(ValueError, match="--pool-k"):
        cstar_real.RealConfig(rhos=(0.1,))


def test_finite_size_leaves_out_a_budget_limit_past_the_grid():
    from experiments import cstar as cstar_exp

    nan = float("nan")
    limits = {}
    for s, (value, reason) in {"4x4x1": (-0.5, "below the grid"), "8x8x1": (1.1, ""),
                               "12x12x1": (1.05, "")}.items():  # fmt: skip
        lim = {"value": value, "low": nan, "high": 1.2, "a": 1.0, "b": 0.5, "reason": reason}
        boots = np.full(10, value)
        limits[s] = {0.5: {"limit": lim, "boot_limits": boots, "longest": 1.2,
                           "boot_longest": np.full(10, 1.2)}}  # fmt: skip
    cfg = cstar_exp.CStarConfig(shapes=tuple(limits), solvers=("gd",), rhos=(1.0, 1.5))
    rows = cstar_exp.finite_size(limits, cfg)
    gd = [r for r in rows if r["quantity"].startswith("GD limit") and r["model"] == "a / d"][0]
    assert np.isnan(gd["points"][0]) and gd["points"][1:] == [1.1, 1.05]
    # b = 1 through the two defined sizes (d = 15, 23): 1.1 = L + a / 15, 1.05 = L + a / 23.
    a = 0.05 / (1 / 15 - 1 / 23)
    assert gd["limit"]["value"] == pytest.approx(1.05 - a / 23)


def test_cstar_real_command_line(capsys):
    from experiments import cstar_real

    cfg = cstar_real.parse_args(["--blocks", "8x8x1", "--rhos", "1.0", "1.5", "--draws", "8"])
    assert cfg.blocks == ("8x8x1",) and cfg.rhos == (1.0, 1.5) and cfg.draws == 8
    assert cfg.ns("8x8x1") == [5, 8]  # round(15 / 3) and round(15 / 2)
    with pytest.raises(SystemExit):
        cstar_real.parse_args(["--blocks", "8x8x9"])
    assert "8x8x9" in capsys.readouterr().err
