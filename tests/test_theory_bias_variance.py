"""ntk.theory.sensing and bias_variance: oracles are the JVP linearization, Eckart-Young, Ky Fan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax import lora
from ntk._testing import mlp
from ntk.theory import bias_variance as bv
from ntk.theory import sensing


def test_sensing_outputs_equal_the_jvp_linearized_lora_model():
    f, params = mlp(jax.random.key(0), sizes=(5, 8, 3), dtype=jnp.float32)
    output_fn = lambda p, b, dropout_rng=None: f(p, b)  # noqa: E731
    cfg = lora.LoraConfig(r=2, alpha=3.0, targets="layer0|layer1")
    batch = {"x": jax.random.normal(jax.random.key(1), (6, 5))}
    adapters = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape),
        lora.init(jax.random.key(3), params, cfg),
    )
    problem = sensing.lora_jacobians(output_fn, params, cfg, batch, chunk=4)  # 4 + 2 rows
    assert problem.jac["layer0"].shape == (6, 3, 5, 8)
    expected = ntk.lora_linearized_model_fn(output_fn, cfg)(adapters, params, batch)
    np.testing.assert_allclose(sensing.outputs(problem, adapters), expected, rtol=1e-5, atol=1e-5)


def test_ky_fan_norm_is_the_supremum_over_the_rank_r_ball():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4))
    u, s, vt = np.linalg.svd(z)
    for r in (1, 2, 4):
        value = bv.ky_fan_2(z, [r])[0]
        x = (u[:, :r] * s[:r]) @ vt[:r] / np.linalg.norm(s[:r])  # unit norm, rank r: attains it
        assert np.sum(z * x) == pytest.approx(value)
        for _ in range(50):  # random rank-r unit matrices never exceed it
            y = rng.normal(size=(5, r)) @ rng.normal(size=(r, 4))
            assert np.sum(z * y) / np.linalg.norm(y) <= value + 1e-12


def _synthetic(s=(3.0, 1.5, 0.4)):
    # Measurements are the 12 entries of a 4 x 3 matrix (K = 1): f_i = f0_i + X_i and the
    # target of every row is onehot(0) = 1, so with f0 = 1 - Y the loss is mean 0.5 (X_i - Y_i)^2.
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(4, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    y = (u * np.asarray(s)) @ v.T
    jac = np.eye(12).reshape(12, 1, 4, 3)
    problem = sensing.SensingProblem(
        jnp.asarray(1.0 - y.reshape(12, 1), jnp.float32),
        {"w": jnp.asarray(jac, jnp.float32)},
        {"w": 1.0},
    )
    return problem, np.asarray(s), np.zeros(12, np.int32)


def _diagonal_problem(values):
    """J[n, k] = values[n, k] E_{ii} with i = n K + k: distinct diagonal entries of one
    (NK x NK) matrix, so every Z has singular values |values| / N whatever the signs."""
    v = np.asarray(values, np.float64)
    n, k = v.shape
    jac = np.zeros((n, k, n * k, n * k))
    for i in range(n):
        for j in range(k):
            jac[i, j, i * k + j, i * k + j] = v[i, j]
    f0 = jnp.zeros((n, k), jnp.float32)
    return sensing.SensingProblem(f0, {"w": jnp.asarray(jac, jnp.float32)}, {"w": 1.0})


def test_joint_rademacher_complexity_by_hand():
    # N = 2, K = 2, values 1, 2 / 3, 4: Z = diag(sigma v) / 2 for every sign vector, so
    # R(r) = B sqrt(sum of the r largest v^2) / N: r = 1: 4 / 2, r = 2: 5 / 2, r = 4: sqrt 30 / 2.
    problem = _diagonal_problem([[1.0, 2.0], [3.0, 4.0]])
    exact, se = bv.rademacher_curve(problem, [1, 2, 4], {"w": 3.0}, exact=True)
    np.testing.assert_allclose(exact, 3.0 * np.array([2.0, 2.5, np.sqrt(30) / 2]), rtol=1e-6)
    np.testing.assert_array_equal(se, 0.0)
    # One supremum per output: output 0 has values 1, 3 and output 1 has 2, 4, each over N = 2:
    # r = 1: (3 + 4) / 2; r = 2: (sqrt 10 + sqrt 20) / 2, above the joint term.
    per_output, _ = bv.rademacher_curve(problem, [1, 2], {"w": 3.0}, exact=True, joint=False)
    np.testing.assert_allclose(per_output, 3.0 * np.array([3.5, (10**0.5 + 20**0.5) / 2]))
    assert np.all(per_output > exact[:2])


def test_rademacher_average_over_signs_by_hand():
    # N = 2, K = 1, both rows on the same entry with values 1 and 3: Z = (s1 + 3 s2) / 2 E_11,
    # E|s1 + 3 s2| = (4 + 2) / 2 = 3, so R = B 3 / 2 at every rank.
    jac = np.zeros((2, 1, 2, 2))
    jac[0, 0, 0, 0], jac[1, 0, 0, 0] = 1.0, 3.0
    problem = sensing.SensingProblem(
        jnp.zeros((2, 1)), {"w": jnp.asarray(jac, jnp.float32)}, {"w": 1.0}
    )
    exact, _ = bv.rademacher_curve(problem, [1, 2], {"w": 2.0}, exact=True)
    np.testing.assert_allclose(exact, [3.0, 3.0], rtol=1e-6)
    # A budget per rank multiplies each rank's term.
    per_rank, _ = bv.rademacher_curve(problem, [1, 2], {"w": np.array([2.0, 4.0])}, exact=True)
    np.testing.assert_allclose(per_rank, [3.0, 6.0], rtol=1e-6)


def test_rademacher_curve_exact_and_monte_carlo():
    problem, _, _ = _synthetic()
    one = sensing.SensingProblem(problem.f0[:1], {"w": problem.jac["w"][:1] * 2.0}, {"w": 1.0})
    # N = 1: |sigma| = 1, so R(r) = B ||J_1||_(2,r) = B * 2 (a single entry, rank one).
    exact, _ = bv.rademacher_curve(one, [1, 2], {"w": 3.0}, exact=True)
    np.testing.assert_allclose(exact, [6.0, 6.0])
    full, _ = bv.rademacher_curve(problem, [1, 2, 3], {"w": 1.0}, exact=True)
    mc, se = bv.rademacher_curve(problem, [1, 2, 3], {"w": 1.0}, draws=400, seed=0)
    assert np.all(np.abs(mc - full) < 4 * se + 1e-9)
    assert np.all(np.diff(full) > 0) and np.all(full[1:] <= np.sqrt([2, 3]) * full[0] + 1e-12)
    with pytest.raises(ValueError, match="2\\^24"):
        bv.rademacher_curve(_diagonal_problem(np.ones((12, 2))), [1], {"w": 1.0}, exact=True)


def test_bound_constants_by_hand():
    # Symmetrization (2) times Maurer's sqrt(2) times G = sqrt(2): 4 R.
    np.testing.assert_allclose(bv.complexity_term(np.array([1.0, 0.25])), [4.0, 1.0])
    # 3 c sqrt(log(2 / 0.05) / (2 N)) at N = 32: 3 sqrt(log(40) / 64) = 0.72024.
    assert bv.confidence_term(32) == pytest.approx(3 * np.sqrt(np.log(40.0) / 64), rel=1e-12)
    assert bv.confidence_term(32) == pytest.approx(0.720242, abs=1e-6)
    assert bv.confidence_term(128) == pytest.approx(bv.confidence_term(32) / 2)


def test_union_bound_grid_and_confidence_by_hand():
    # log(2 * 1600 / 0.05) = log(64000) in place of log(40): 1600 classes share delta.
    assert bv.confidence_term(32, 1600) == pytest.approx(3 * np.sqrt(np.log(64000.0) / 64))
    assert bv.confidence_term(32, 1) == bv.confidence_term(32)
    got = bv.grid_budgets({"w": np.array([0.0, 1e-3, 1.1e-3, 0.5, 1.0, 3.0])}, base=1e-3,
                          levels=11)  # fmt: skip
    # 1e-3 * 2^j: 0 and 1e-3 -> 1e-3; 1.1e-3 -> 2e-3; 0.5 -> 0.512; 1.0 -> 1.024 (j = 10);
    # 3.0 would need j = 12 > 10: past the grid.
    np.testing.assert_allclose(got["w"], [1e-3, 1e-3, 2e-3, 0.512, 1.024, np.inf])


def test_lipschitz_constant_is_the_sup_of_the_cross_entropy_gradient():
    # d CE / d logits = softmax - onehot: its norm approaches sqrt 2 (all mass on a wrong
    # class) and never exceeds it.
    def grad_norm(z, y):
        p = np.exp(z - z.max())
        p /= p.sum()
        return np.linalg.norm(p - np.eye(len(z))[y])

    rng = np.random.default_rng(0)
    norms = [grad_norm(rng.normal(scale=5, size=4), 0) for _ in range(2000)]
    assert max(norms) <= bv.LIPSCHITZ + 1e-12
    assert grad_norm(np.array([0.0, 40.0, 0.0]), 0) == pytest.approx(bv.LIPSCHITZ, rel=1e-9)


def test_min_norm_budgets_by_hand():
    # Two matrices, J_1[i] = a_i E_i and J_2[i] = b_i E_i (distinct entries): the Gram matrix
    # is diag(a^2 + b^2), the coefficients c_i = res_i / (a_i^2 + b_i^2), and
    # ||dW_1|| = sqrt(sum (c_i a_i)^2), ||dW_2|| = sqrt(sum (c_i b_i)^2).
    a = np.array([1.0, 2.0, 0.5, 1.5])
    b = np.array([2.0, 1.0, 1.0, 0.5])
    f0 = np.array([[0.2, 0.1], [0.3, -0.2]])  # N = 2, K = 2; rows i = 2 n + k
    labels = np.array([0, 1])
    res = (np.eye(2)[labels] - f0).reshape(-1)
    j1 = np.zeros((2, 2, 2, 2))
    j2 = np.zeros((2, 2, 2, 2))
    for i in range(4):
        j1[i // 2, i % 2].flat[i] = a[i]
        j2[i // 2, i % 2].flat[i] = b[i]
    problem = sensing.SensingProblem(
        jnp.asarray(f0), {"p": jnp.asarray(j1), "q": jnp.asarray(j2)}, {"p": 1.0, "q": 1.0}
    )
    c = res / (a**2 + b**2)
    budgets = bv.min_norm_budgets(problem, labels, ridge=0.0)
    assert budgets["p"] == pytest.approx(np.linalg.norm(c * a), rel=1e-5)
    assert budgets["q"] == pytest.approx(np.linalg.norm(c * b), rel=1e-5)


def test_fit_curve_matches_eckart_young_with_a_norm_ball_and_the_known_minimum():
    problem, s, labels = _synthetic()
    ranks = [1, 2, 3]
    top = np.sqrt(np.cumsum(s**2))
    for budget in (100.0, 2.0):  # same shapes: one compiled program
        fit = bv.fit_curve(problem, labels, ranks, {"w": budget}, loss="mse", steps=1500, lr=3e-2)
        # min over rank <= r, ||X|| <= B of ||X - Y||^2 = ||Y||^2 - 2 t ||Y_r|| + t^2,
        # t = min(B, ||Y_r||) (Y_r: the top-r truncation).
        t = np.minimum(budget, top)
        expected = 0.5 * (np.sum(s**2) - 2 * t * top + t**2) / 12
        np.testing.assert_allclose(fit, expected, atol=5e-4)
        if budget == 100.0:
            # fit(r) = 0.5 sum_{i>r} s_i^2 / 12; with complexity 0.05 sqrt(r) the sums are
            # 0.1004 + 0.05, 0.0067 + 0.0707, 0 + 0.0866: the minimum is at r = 2.
            result = bv.bias_variance(ranks, fit, 0.05 * np.sqrt(ranks))
            assert result.best_rank == 2
            np.testing.assert_allclose(result.total, fit + 0.05 * np.sqrt(ranks))


def test_fit_with_norms_reaches_eckart_young_and_reports_its_norm():
    # No ball: rank r's update tends to Y_r, the top-r truncation of Y (norm sqrt(sum of the
    # r largest s^2)), with loss 0.5 sum_{i > r} s_i^2 / 12.
    problem, s, labels = _synthetic()
    out = bv.fit_with_norms(problem, labels, [1, 2, 3], loss="mse", steps=1500, lr=3e-2)
    top = np.sqrt(np.cumsum(s**2))
    np.testing.assert_allclose(out.norms["w"], top, rtol=2e-3)
    np.testing.assert_allclose(out.loss, 0.5 * (np.sum(s**2) - top**2) / 12, atol=5e-4)


def test_levenberg_marquardt_jacobian_and_the_eckart_young_minimum():
    # The 12 entries of a 4 x 3 matrix are the measurements (K = 1): at rank 1 the minimum of
    # 0.5 ||X - Y||^2 / 12 is Eckart-Young's 0.5 (s_2^2 + s_3^2) / 12; a rank-1 Y is fit exactly.
    problem, s, _ = _synthetic()
    targets = jnp.ones((12, 1))  # f0 = 1 - Y: the residual of X is X - Y
    rng = np.random.default_rng(0)
    start = {"w": {"lora_a": jnp.asarray(rng.normal(size=(4, 1)) * 0.1),
                   "lora_b": jnp.asarray(rng.normal(size=(1, 3)) * 0.1)}}  # fmt: skip
    # The hand Jacobian equals reverse mode (with a LoRA scale of 2.5).
    x = jnp.concatenate([start["w"]["lora_a"].ravel(), start["w"]["lora_b"].ravel()])
    scaled = problem._replace(scale={"w": 2.5})

    def f(x):
        ad = {"w": {"lora_a": x[:4].reshape(4, 1), "lora_b": x[4:].reshape(1, 3)}}
        return sensing.outputs(scaled, ad).reshape(-1)

    np.testing.assert_allclose(
        sensing._residual_jacobian(scaled, start), jax.jacrev(f)(x), rtol=1e-5, atol=1e-7
    )
    losses, end = sensing.levenberg_marquardt(problem, targets, start, iters=60)
    assert np.all(np.diff(losses) <= 0)  # steps are kept only when the loss falls
    assert losses[-1] == pytest.approx(0.5 * (s[1] ** 2 + s[2] ** 2) / 12, rel=1e-4)
    rank_one, _, _ = _synthetic(s=(2.0, 0.0, 0.0))
    losses, _ = sensing.levenberg_marquardt(rank_one, targets, start, iters=60)
    assert losses[-1] < 1e-8 * losses[0]
