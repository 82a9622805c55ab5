"""ntk.theory.pl: the PL constant of a strongly convex quadratic is its smallest eigenvalue."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ntk.theory import pl


def test_pl_constant_of_a_quadratic_is_bounded_by_and_tends_to_the_extreme_eigenvalues():
    # L(x) = 1/2 (x - c)^T H (x - c), H = Q diag(eig) Q^T: ||grad||^2 = e^T H^2 e and
    # 2 (L - L*) = e^T H e, so mu_t is a Rayleigh quotient of H: in [min eig, max eig], and
    # GD aligns the error with the slowest eigenvector, so mu_t -> min eig = 0.5.
    eig = np.array([0.5, 1.0, 2.0, 4.0])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    h = jnp.asarray(q @ np.diag(eig) @ q.T)
    c = jnp.arange(4.0)

    def loss(x, data):
        e = x["x"] - data["c"]
        return 0.5 * e @ data["h"] @ e

    traj = pl.trajectory(loss, {"x": jnp.zeros(4)}, {"c": c, "h": h}, steps=60, learning_rate=0.2)
    mu = pl.pl_constants(traj, l_star=0.0)
    finite = mu[np.isfinite(mu)]
    assert finite.size > 40
    assert finite.min() >= eig.min() - 1e-5 and finite.max() <= eig.max() + 1e-5
    assert abs(finite[-1] - eig.min()) < 1e-3
    # The loss falls at least as fast as PL promises: L_{t+1} <= (1 - lr mu (2 - lr L)) L_t.
    lr, smooth = 0.2, eig.max()
    rate = 1 - lr * eig.min() * (2 - lr * smooth)
    assert np.all(traj.loss[1:21] <= rate * traj.loss[:20] * (1 + 1e-5))


def test_pl_constants_are_nan_at_the_infimum():
    traj = pl.Trajectory(np.array([2.0, 1.0, 0.0]), np.array([4.0, 1.0, 0.0]), None)
    np.testing.assert_allclose(pl.pl_constants(traj), [1.0, 0.5, np.nan])


def test_trajectory_stops_at_the_first_iterate_below_the_target():
    # L(x) = 0.5 h x^2, GD: x_t = (1 - lr h)^t x_0, L_t = L_0 (1 - lr h)^(2 t). With h = 1,
    # lr = 0.1, x_0 = 1: L_t = 0.5 * 0.81^t <= 1e-3 first at t = ceil(log(2e-3) / log 0.81) = 30.
    def loss(p, data):
        return 0.5 * data * p["x"] ** 2

    traj = pl.trajectory(loss, {"x": jnp.ones(())}, 1.0, steps=100, learning_rate=0.1,
                         stop_below=1e-3)  # fmt: skip
    t = int(np.ceil(np.log(2e-3) / np.log(0.81)))
    assert t == 30 and len(traj.loss) == t + 1
    np.testing.assert_allclose(traj.loss, 0.5 * 0.81 ** np.arange(t + 1), rtol=1e-5)
    np.testing.assert_allclose(traj.grad_sq, 0.81 ** np.arange(t + 1), rtol=1e-5)
    full = pl.trajectory(loss, {"x": jnp.ones(())}, 1.0, steps=100, learning_rate=0.1)
    assert len(full.loss) == 101


def test_logistic_loss_meets_the_lojasiewicz_form_with_exponent_one():
    # One example with margin 1: L(w) = log(1 + e^-w), |dL/dw| = sigmoid(-w) = 1 - e^-L, so
    # ||grad L|| / L -> 1 as L -> 0 (||grad L|| >= c L with c = (1 - e^-L0) / L0 along GD),
    # while ||grad L||^2 / 2L (the PL ratio) -> 0: the Lojasiewicz form is the one that holds.
    def loss(p, data):
        return jnp.logaddexp(0.0, -p["w"])

    traj = pl.trajectory(loss, {"w": jnp.zeros(())}, None, steps=3000, learning_rate=1.0)
    g = np.sqrt(traj.grad_sq)
    np.testing.assert_allclose(g, 1 - np.exp(-traj.loss), rtol=1e-5)
    ratio = g / traj.loss
    assert np.all(ratio >= (1 - np.exp(-np.log(2))) / np.log(2) - 1e-6)
    assert ratio[-1] == pytest.approx(1.0, abs=2e-3)
    assert pl.pl_constants(traj)[-1] < 2e-3  # PL's mu_t falls with L
    q = np.polyfit(np.log(traj.loss[100:]), np.log(g[100:]), 1)[0]
    assert q == pytest.approx(1.0, abs=0.01)
