"""ntk.solvers against closed forms written out in numpy / scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ntk
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss
from ntk import _testing

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOL64 = _testing.tolerance(np.float64)


def _problem(n=6, m=4, k=3, seed=0):
    """A random PSD full kernel [N+M, N+M, K, K] from random Jacobians, labels, f0."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(n + m, k, 20))
    kern = np.einsum("akp,blp->abkl", jac, jac) / 20
    f0 = 0.3 * rng.normal(size=(n + m, k))
    labels = np.arange(n) % k
    return kern[n:, :n], kern[:n, :n], labels, f0[:n], f0[n:]


def _mat(k):
    return ntk.kernel_matrix(k)


@pytest.mark.parametrize("traced", [False, True])
def test_mse_infinite_time_is_kernel_ridge(traced):
    k_st, k_tt, labels, f0, f0_test = _problem()
    if traced:
        k_st, k_tt = np.einsum("abkk->ab", k_st) / 3, np.einsum("abkk->ab", k_tt) / 3
    reg = 1e-2
    y = np.eye(3)[labels]
    with jax.enable_x64():
        got = ntk.mse_predict(
            jnp.asarray(k_tt),
            labels,
            jnp.asarray(k_st),
            f0,
            f0_test,
            t=None,
            diag_reg=reg,
            diag_reg_absolute_scale=True,
            trace_axes=(-1,) if traced else (),
        )
    if traced:
        coef = np.linalg.solve(k_tt + reg * np.eye(6), y - f0)  # (N, K), same for each output
        expected = f0_test + k_st @ coef
    else:
        coef = np.linalg.solve(_mat(k_tt) + reg * np.eye(18), (y - f0).reshape(-1))
        expected = f0_test + (_mat(k_st) @ coef).reshape(4, 3)
    np.testing.assert_allclose(got.test, expected, **TOL64)
    np.testing.assert_allclose(got.train, y, **TOL64)


def test_mse_relative_regularizer_scales_by_mean_trace():
    k_st, k_tt, labels, f0, f0_test = _problem()
    with jax.enable_x64():
        rel = ntk.mse_predict(
            jnp.asarray(k_tt), labels, jnp.asarray(k_st), f0, f0_test, diag_reg=1e-2, trace_axes=()
        )
        scale = np.trace(_mat(k_tt)) / 18
        ab = ntk.mse_predict(
            jnp.asarray(k_tt),
            labels,
            jnp.asarray(k_st),
            f0,
            f0_test,
            diag_reg=1e-2 * scale,
            diag_reg_absolute_scale=True,
            trace_axes=(),
        )
    np.testing.assert_allclose(rel.test, ab.test, **TOL64)


def test_mse_finite_time_matches_expm():
    k_st, k_tt, labels, f0, f0_test = _problem()
    y = np.eye(3)[labels]
    lr, ts = 0.3, np.array([0.5, 4.0, 40.0])
    with jax.enable_x64():
        got = ntk.mse_predict(
            jnp.asarray(k_tt),
            labels,
            jnp.asarray(k_st),
            f0,
            f0_test,
            t=ts,
            learning_rate=lr,
            trace_axes=(),
        )
    theta, theta_st = _mat(k_tt), _mat(k_st)
    for i, t in enumerate(ts):
        # Loss mean_n 0.5 ||f_n - y_n||^2: df/dt = -lr * Theta (f - y) / N.
        e = scipy.linalg.expm(-lr * t * theta / 6)
        train = y.reshape(-1) + e @ (f0 - y).reshape(-1)
        test = f0_test.reshape(-1) + theta_st @ np.linalg.solve(
            theta, (np.eye(18) - e) @ (y - f0).reshape(-1)
        )
        np.testing.assert_allclose(got.train[i], train.reshape(6, 3), rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(got.test[i], test.reshape(4, 3), rtol=1e-7, atol=1e-7)


def test_ce_gradient_flow_matches_rk4():
    k_st, k_tt, labels, f0, f0_test = _problem()
    y = np.eye(3)[labels]
    lr, t_end = 0.5, 30.0
    with jax.enable_x64():
        got = ntk.ce_gradient_flow(
            jnp.asarray(k_tt),
            labels,
            jnp.asarray(k_st),
            f0,
            f0_test,
            t=t_end,
            learning_rate=lr,
            trace_axes=(),
        )
    theta = np.concatenate([_mat(k_tt), _mat(k_st)])  # (N K + M K, N K)

    def rhs(z):
        f = z[:18].reshape(6, 3)
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return -lr * theta @ ((p - y) / 6).reshape(-1)

    z, h = np.concatenate([f0.reshape(-1), f0_test.reshape(-1)]), t_end / 600
    for _ in range(600):
        a = rhs(z)
        b = rhs(z + h / 2 * a)
        c = rhs(z + h / 2 * b)
        d = rhs(z + h * c)
        z = z + h / 6 * (a + 2 * b + 2 * c + d)
    np.testing.assert_allclose(got.train, z[:18].reshape(6, 3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.test, z[18:].reshape(4, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("traced", [False, True])
def test_kernel_logistic_regression_is_optimal(traced):
    k_st, k_tt, labels, f0, f0_test = _problem()
    if traced:
        k_st, k_tt = np.einsum("abkk->ab", k_st) / 3, np.einsum("abkk->ab", k_tt) / 3
    reg = 1e-2
    fit = ntk.kernel_logistic_regression(k_tt, labels, k_st, f0, f0_test, diag_reg=reg)
    theta = np.kron(k_tt, np.eye(3)) if traced else _mat(k_tt)
    theta_st = np.kron(k_st, np.eye(3)) if traced else _mat(k_st)

    def objective(alpha):
        f = f0.reshape(-1) + theta @ alpha
        logp = jax.nn.log_softmax(f.reshape(6, 3), axis=-1)
        return -jnp.sum(np.eye(3)[labels] * logp) / 6 + 0.5 * reg * alpha @ theta @ alpha

    with jax.enable_x64():
        grad = jax.grad(objective)(jnp.asarray(fit.coef.reshape(-1)))
    assert np.abs(grad).max() < 1e-9 and fit.grad_norm < 1e-9
    np.testing.assert_allclose(
        fit.test, f0_test + (theta_st @ fit.coef.reshape(-1)).reshape(4, 3), **TOL64
    )
    np.testing.assert_allclose(
        fit.train, f0 + (theta @ fit.coef.reshape(-1)).reshape(6, 3), **TOL64
    )


@pytest.mark.parametrize("num_classes", [2, 3])
def test_kernel_svm_separable_blobs(num_classes):
    rng = np.random.default_rng(0)
    centers = 4.0 * np.eye(3)[:num_classes]
    labels = np.repeat(np.arange(num_classes), 10)
    x = centers[labels] + 0.5 * rng.normal(size=(labels.size, 3))
    test_labels = np.repeat(np.arange(num_classes), 5)
    x_test = centers[test_labels] + 0.5 * rng.normal(size=(test_labels.size, 3))
    c = 10.0
    fit = ntk.kernel_svm(x @ x.T, labels, x_test @ x.T, diag_reg=1 / c, tol=1e-8)
    assert fit.train.shape == (labels.size, num_classes)
    assert (fit.test.argmax(1) == test_labels).all() and (fit.train.argmax(1) == labels).all()
    assert fit.max_violation < 1e-6
    for k in range(num_classes):  # KKT of each one-vs-rest problem
        alpha, margin = fit.dual_coef[k], fit.signs[k] * fit.train[:, k]
        assert (alpha >= 0).all() and (alpha <= c).all()
        assert (margin[alpha == 0] >= 1 - 1e-6).all()
        free = (alpha > 1e-9) & (alpha < c - 1e-9)
        np.testing.assert_allclose(margin[free], 1.0, atol=1e-6)
        assert (margin[alpha >= c - 1e-9] <= 1 + 1e-6).all()
        assert free.any()


def test_solver_errors():
    k_st, k_tt, labels, f0, f0_test = _problem()
    with pytest.raises(ValueError, match="trace_axes"):
        ntk.mse_predict(k_tt, labels, k_st, trace_axes=(-1,))
    with pytest.raises(ValueError, match="k_test_train"):
        ntk.mse_predict(k_tt, labels, k_st[:, :3], trace_axes=())
    with pytest.raises(ValueError, match="infer K"):
        ntk.kernel_logistic_regression(k_tt[:, :, 0, 0], labels, k_st[:, :, 0, 0])


def test_function_space_gd_takes_the_loss_enum_and_its_values():
    """``loss`` is ``lora_jax.losses.Loss``; its values ('ce', 'mse') name the same loss. The
    oracle: the recursion written out in numpy."""
    k_st, k_tt, labels, f0, f0_test = _problem()
    y = np.eye(3)[labels]
    f_tr, f_te = f0.copy(), f0_test.copy()
    for _ in range(5):  # f <- f - lr * Theta grad_f mean_n CE
        p = np.exp(f_tr - f_tr.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - y) / 6
        f_tr, f_te = (
            f_tr - 0.5 * np.einsum("mnkl,nl->mk", k_tt, g),
            f_te - 0.5 * np.einsum("mnkl,nl->mk", k_st, g),
        )
    with jax.enable_x64():
        for loss in (Loss.CE, "ce"):
            got = ntk.function_space_gd(
                k_tt, labels, k_st, f0, f0_test, steps=5, learning_rate=0.5, loss=loss
            )
            np.testing.assert_allclose(got.train, f_tr, **TOL64)
            np.testing.assert_allclose(got.test, f_te, **TOL64)
        mse = ntk.function_space_gd(
            k_tt, labels, k_st, f0, f0_test, steps=5, learning_rate=0.5, loss=Loss.MSE
        )
        assert not np.allclose(mse.train, f_tr)
    with pytest.raises(ConfigError, match=r"loss='hinge'.*'ce', 'mse'"):
        ntk.function_space_gd(k_tt, labels, k_st, steps=1, learning_rate=0.1, loss="hinge")


def test_kernel_svm_diag_reg_is_the_inverse_box_constraint():
    """``diag_reg`` is the ridge on a sum of hinge losses: the dual's box is [0, 1 / diag_reg].
    On overlapping classes some alphas sit at the box exactly."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 12)
    x = np.c_[labels - 0.5, np.zeros(24)] + rng.normal(size=(24, 2))  # overlapping blobs
    for diag_reg in (0.5, 4.0):
        fit = ntk.kernel_svm(x @ x.T, labels, x @ x.T, diag_reg=diag_reg, tol=1e-9)
        assert fit.max_violation < 1e-6
        assert fit.dual_coef.max() == pytest.approx(1 / diag_reg)  # bound active
        assert (fit.dual_coef >= 0).all() and (fit.dual_coef <= 1 / diag_reg + 1e-12).all()


@pytest.mark.parametrize("solver", ["kernel_logistic_regression", "kernel_svm"])
def test_diag_reg_must_be_positive(solver):
    k_st, k_tt, labels, _, _ = _problem()
    with pytest.raises(ConfigError, match=r"diag_reg must be > 0, got 0"):
        getattr(ntk, solver)(k_tt, labels, k_st, diag_reg=0.0)
