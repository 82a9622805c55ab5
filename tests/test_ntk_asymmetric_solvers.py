"""Solvers with an asymmetric (A-SignGD-like) kernel against closed forms and an ODE solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import ntk
from lora_jax.errors import ConfigError
from ntk.asymmetric import asymmetric_ls

N, M, K, P = 6, 4, 3, 200


def _asym_kernels(seed=0, full=True):
    """``K(x, x') = <g(x), sign g(x')>`` of random gradients: train x train, test x train,
    train x test, in the full ``[., ., K, K]`` layout (or traced)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(N + M, K, P)) / np.sqrt(P)
    kk = np.einsum("akp,blp->abkl", g, np.sign(g))  # (N+M, N+M, K, K)
    if not full:
        kk = np.einsum("abkk->ab", kk) / K
    return kk[:N, :N], kk[N:, :N], kk[:N, N:]


def _flow(ktt, kst, y, f0, f0_test, lr, t):
    """The squared-error flow ``df/dt = -lr K (f - y) / N`` by an adaptive ODE solver."""
    km = ntk.kernel_matrix(ktt)
    ksm = ntk.kernel_matrix(kst)
    nk = km.shape[0]

    def rhs(_, z):
        r = z[:nk] - y.reshape(-1)
        return -lr / N * np.concatenate([km @ r, ksm @ r])

    z0 = np.concatenate([f0.reshape(-1), f0_test.reshape(-1)])
    z = scipy.integrate.solve_ivp(rhs, (0, t), z0, rtol=1e-12, atol=1e-12, method="DOP853").y
    return z[:nk, -1].reshape(N, K), z[nk:, -1].reshape(M, K)


def test_asymmetric_mse_flow_matches_an_ode_solver_and_its_limit():
    ktt, kst, _ = _asym_kernels()
    assert not np.allclose(ktt, ktt.transpose(1, 0, 3, 2))  # really asymmetric
    rng = np.random.default_rng(1)
    labels = rng.integers(0, K, N)
    y = np.eye(K)[labels]
    f0, f0_test = 0.1 * rng.normal(size=(N, K)), 0.1 * rng.normal(size=(M, K))
    with jax.enable_x64():
        ts = np.array([0.5, 3.0])
        got = ntk.mse_predict(
            ktt, labels, kst, f0, f0_test, t=ts, learning_rate=2.0, trace_axes=(), kernel="asigngd"
        )
        assert got.train.shape == (2, N, K) and got.test.shape == (2, M, K)
        for i, t in enumerate(ts):
            train, test = _flow(ktt, kst, y, f0, f0_test, 2.0, t)
            np.testing.assert_allclose(got.train[i], train, rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(got.test[i], test, rtol=1e-9, atol=1e-10)
        limit = ntk.mse_predict(
            ktt, labels, kst, f0, f0_test, t=None, trace_axes=(), kernel=ntk.Kernel.ASIGNGD
        )
        np.testing.assert_allclose(limit.train, y, atol=1e-10)  # interpolates, diag_reg = 0
        train, test = _flow(ktt, kst, y, f0, f0_test, 1.0, 3000.0)
        np.testing.assert_allclose(limit.test, test, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("full", [True, False], ids=["full", "traced"])
def test_general_solve_on_a_symmetric_kernel_equals_nt(full):
    rng = np.random.default_rng(2)
    g = rng.normal(size=(N + M, K, 8))
    kk = np.einsum("akp,blp->abkl", g, g)
    if not full:
        kk = np.einsum("abkk->ab", kk) / K
    ktt, kst = kk[:N, :N], kk[N:, :N]
    labels = rng.integers(0, K, N)
    f0, f0_test = 0.1 * rng.normal(size=(N, K)), 0.1 * rng.normal(size=(M, K))
    trace_axes = () if full else (-1,)
    with jax.enable_x64():
        for t, reg in ((None, 1e-3), (np.array([0.3, 2.0]), 0.0)):
            kwargs = dict(t=t, diag_reg=reg, learning_rate=0.7, trace_axes=trace_axes)
            args = (jnp.asarray(ktt), labels, jnp.asarray(kst), f0, f0_test)
            want = ntk.mse_predict(*args, **kwargs)
            got = ntk.mse_predict(*args, **kwargs, kernel=ntk.Kernel.ASIGNGD)
            np.testing.assert_allclose(got.train, want.train, rtol=1e-8, atol=1e-9)
            np.testing.assert_allclose(got.test, want.test, rtol=1e-8, atol=1e-9)


def test_asymmetric_ls_equals_its_primal_solved_in_feature_space():
    """AsK-LS dual against the primal's stationarity conditions in explicit features
    ``K(x, x') = <phi_1(x), phi_2(x')>``: ``v = gamma Phi_1^T S (1 - S Phi_1 w)``,
    ``w = gamma Phi_2^T S (1 - S Phi_2 v)``, one linear system in (w, v)."""
    rng = np.random.default_rng(3)
    d = 9
    phi1, phi2 = rng.normal(size=(N + M, d)), rng.normal(size=(N + M, d))
    kk = phi1 @ phi2.T
    ktt, kst, kts = kk[:N, :N], kk[N:, :N], kk[:N, N:]
    labels = np.array([0, 1, 2, 0, 1, 2])
    diag_reg, weight = 0.5, 0.3
    fit = asymmetric_ls(ktt, labels, kst, kts, diag_reg=diag_reg, weight=weight)
    gamma = 1.0 / diag_reg
    a1, a2 = phi1[:N], phi2[:N]
    for k in range(K):
        s = np.where(labels == k, 1.0, -1.0)
        # Unknowns (w, v): gamma A1^T A1 w + v = gamma A1^T s ; w + gamma A2^T A2 v = gamma A2^T s
        lhs = np.block([[gamma * a1.T @ a1, np.eye(d)], [np.eye(d), gamma * a2.T @ a2]])
        rhs = np.concatenate([gamma * a1.T @ s, gamma * a2.T @ s])
        w, v = np.split(np.linalg.solve(lhs, rhs), 2)
        want = weight * phi1 @ w + (1 - weight) * phi2 @ v  # f_1 = <w, phi_1>, f_2 = <v, phi_2>
        np.testing.assert_allclose(fit.train[:, k], want[:N], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(fit.test[:, k], want[N:], rtol=1e-9, atol=1e-10)


def test_asymmetric_ls_on_a_symmetric_kernel_is_the_ls_svm():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N + M, 5))
    kk = x @ x.T
    labels = np.array([0, 1, 0, 1, 1, 0])
    fit = asymmetric_ls(kk[:N, :N], labels, kk[N:, :N], kk[:N, N:], diag_reg=0.2, num_classes=2)
    for k in range(2):
        s = np.where(labels == k, 1.0, -1.0)
        alpha = np.linalg.solve(s[:, None] * kk[:N, :N] * s + 0.2 * np.eye(N), np.ones(N))
        np.testing.assert_allclose(fit.alpha[k], alpha, rtol=1e-10)
        np.testing.assert_allclose(fit.beta[k], alpha, rtol=1e-10)
        np.testing.assert_allclose(fit.test[:, k], kk[N:, :N] @ (alpha * s), rtol=1e-10)
    with pytest.raises(ConfigError, match="diag_reg must be > 0"):
        asymmetric_ls(kk[:N, :N], labels, kk[N:, :N], kk[:N, N:], diag_reg=0.0)


def test_logistic_regression_with_an_asymmetric_kernel_meets_its_fixed_point():
    ktt, kst, _ = _asym_kernels(5)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, K, N)
    f0 = 0.1 * rng.normal(size=(N, K))
    fit = ntk.kernel_logistic_regression(
        ktt, labels, kst, f0, 0.0, diag_reg=1e-2, kernel=ntk.Kernel.ASIGNGD
    )
    # The condition, computed here: f = f0 + Theta alpha, (softmax(f) - y) / N + reg alpha = 0.
    f = f0 + (ntk.kernel_matrix(ktt) @ fit.coef.reshape(-1)).reshape(N, K)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    resid = (p - np.eye(K)[labels]) / N + 1e-2 * fit.coef
    assert np.abs(resid).max() < 1e-9 and fit.grad_norm < 1e-9
    np.testing.assert_allclose(fit.train, f, rtol=1e-10)
    np.testing.assert_allclose(
        fit.test, (ntk.kernel_matrix(kst) @ fit.coef.reshape(-1)).reshape(M, K)
    )
    # On a symmetric kernel the fixed point is the optimum the objective's line search finds.
    sym = (ktt + ktt.transpose(1, 0, 3, 2)) / 2
    a = ntk.kernel_logistic_regression(sym, labels, kst, f0, diag_reg=1e-2)
    b = ntk.kernel_logistic_regression(sym, labels, kst, f0, diag_reg=1e-2, kernel="asigngd")
    np.testing.assert_allclose(a.test, b.test, rtol=1e-8, atol=1e-10)


def test_function_space_gd_steps_along_rows_of_an_asymmetric_kernel():
    ktt, kst, _ = _asym_kernels(6, full=False)
    y = np.eye(K)[np.arange(N) % K]
    with jax.enable_x64():
        got = ntk.function_space_gd(
            jnp.asarray(ktt),
            y,
            jnp.asarray(kst),
            0.0,
            0.0,
            steps=1,
            learning_rate=0.5,
            loss="mse",
        )
    grad = (0.0 - y) / N  # d mean_n 0.5 ||f_n - y_n||^2 / df at f = 0
    np.testing.assert_allclose(got.train, -0.5 * ktt @ grad, rtol=1e-12)  # row = predicted
    np.testing.assert_allclose(got.test, -0.5 * kst @ grad, rtol=1e-12)
