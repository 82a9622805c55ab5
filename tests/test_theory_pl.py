"""ntk.theory.pl: the PL constant of a strongly convex quadratic is its smallest eigenvalue."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

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
