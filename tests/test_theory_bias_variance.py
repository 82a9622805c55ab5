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
