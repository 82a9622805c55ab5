"""ntk.theory.landscape and experiments.landscape: oracles are eigh on explicit matrices,
jax.hessian, and the known stationary points of a fully observed rank-1 factorization."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import landscape as land_exp
from lora_jax.errors import ConfigError
from ntk.theory import landscape, sensing


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64():
        yield


def _symmetric(dim=40, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = np.concatenate([[-3.0, -1.0], np.linspace(0.0, 1.0, dim - 4), [4.0, 9.0]])
    return q @ np.diag(eig) @ q.T, eig


def test_lanczos_equals_eigh_on_an_explicit_matrix():
    a, eig = _symmetric()
    full = landscape.lanczos(lambda v: a @ v, 40, iters=40)
    np.testing.assert_allclose(full.ritz, np.linalg.eigvalsh(a), atol=1e-9)
    # A few steps already give the well-separated extremes.
    few = landscape.lanczos(lambda v: a @ v, 40, iters=20, seed=3)
    assert few.ritz[0] == pytest.approx(-3.0, abs=1e-6)
    assert few.ritz[-1] == pytest.approx(9.0, abs=1e-6)
    # T is the operator in the Lanczos basis: its trace is at most the sum of |eigenvalues|.
    assert few.alpha.size == 20 and few.beta.size == 19
    # A rank-2 operator has an invariant Krylov space of size 2: the iteration stops there.
    u = np.random.default_rng(1).normal(size=(10, 2))
    low = landscape.lanczos(lambda v: u @ (u.T @ v), 10, iters=10)
    assert low.ritz.size <= 3
    np.testing.assert_allclose(low.ritz[-2:], np.linalg.eigvalsh(u.T @ u), rtol=1e-9)
    with pytest.raises(ConfigError, match="iters"):
        landscape.lanczos(lambda v: v, 5, iters=6)


def test_hvp_is_the_hessian_times_a_vector():
    def f(x, c):
        return jnp.sum(jnp.sin(x) * x[::-1]) + 0.5 * c * (x @ x) ** 2

    x = jnp.linspace(-1.0, 1.0, 6)
    v = jnp.arange(6.0) - 2.0
    expected = jax.hessian(f)(x, 3.0) @ v
    np.testing.assert_allclose(landscape.hvp(f, x, 3.0)(v), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "loss, grad, lam_min, best, expected",
    [
        (0.0, 1e-9, 0.0, 0.0, landscape.EndPoint.GLOBAL),
        (0.3, 1e-9, 1e-3, 0.0, landscape.EndPoint.SPURIOUS),
        (0.3, 1e-9, 1e-3, 0.3, landscape.EndPoint.GLOBAL),  # the lowest any start found
        (0.3, 1e-9, -0.5, 0.0, landscape.EndPoint.SADDLE),
        (0.3, 1e-9, -1e-9, 0.0, landscape.EndPoint.SPURIOUS),  # -1e-9 is within tolerance
        (0.3, 1e-2, 1e-3, 0.0, landscape.EndPoint.NOT_STATIONARY),
    ],
)
def test_classify_branches(loss, grad, lam_min, best, expected):
    out = landscape.classify(loss, grad, lam_min, 2.0, best, grad_tol=1e-6, hess_tol=1e-6,
                             loss_tol=1e-8)  # fmt: skip
    assert out is expected


def _factorization(s=(3.0, 1.5, 0.4)):
    # Every entry of a 4 x 3 matrix observed (K = 1): the loss is 0.5 ||s A B - Y||^2 / 12, whose
    # rank-1 stationary points are A B = s_i u_i v_i^T: the top pair is the global minimum,
    # the others are saddles (Eckart-Young).
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(4, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    y = (u * np.asarray(s)) @ v.T
    problem = sensing.SensingProblem(
        jnp.zeros((12, 1)), {"w": jnp.asarray(np.eye(12).reshape(12, 1, 4, 3))}, {"w": 1.0}
    )
    return problem, jnp.asarray(y.reshape(12, 1)), u, v, np.asarray(s)


def test_end_points_of_a_factorization_are_classified_as_eckart_young_says():
    problem, targets, u, v, s = _factorization()
    cfg = land_exp.LandscapeConfig(grad_tol=1e-9, hess_tol=1e-6, loss_tol=1e-9)
    points = []
    for i in range(3):
        ab = {"w": {"lora_a": jnp.asarray(u[:, i : i + 1] * np.sqrt(s[i])),
                    "lora_b": jnp.asarray(np.sqrt(s[i]) * v[:, i : i + 1].T)}}  # fmt: skip
        p = land_exp.end_point(problem, targets, ab, lanczos_iters=7)
        # the loss there is the energy of the other singular values
        assert p["loss"] == pytest.approx(0.5 * (np.sum(s**2) - s[i] ** 2) / 12, rel=1e-10)
        assert p["grad_norm"] < 1e-12
        points.append({"start": i, "loss_start": 1.0, **p})
    # The Hessian at the top pair is PSD (the zero eigenvalue is the A c, B / c symmetry); at
    # the others a direction toward the top pair lowers the loss.
    assert points[0]["lam_min"] > -1e-12 and points[1]["lam_min"] < -1e-3
    got = [p["class"] for p in land_exp.classify_points(points, cfg)]
    assert got == ["global minimum", "saddle", "saddle"]
    # Seen alone (no start found better), the second pair would still be a saddle, never global.
    alone = land_exp.classify_points(points[1:2], cfg)
    assert alone[0]["class"] == "saddle"


def test_levenberg_marquardt_from_random_starts_reaches_the_global_minimum():
    problem, targets, *_ = _factorization()
    template = {"w": {"lora_a": jnp.zeros((4, 1)), "lora_b": jnp.zeros((1, 3))}}
    cfg = land_exp.LandscapeConfig(grad_tol=1e-8, hess_tol=1e-6, loss_tol=1e-8)
    points = []
    for i in range(3):
        a0 = land_exp.random_start(jax.random.key(i), template, 1.0)
        assert a0["w"]["lora_a"].shape == (4, 1) and float(jnp.abs(a0["w"]["lora_b"]).sum()) > 0
        losses, end = sensing.levenberg_marquardt(problem, targets, a0, iters=200)
        points.append({"start": i, "loss_start": float(losses[0]),
                       **land_exp.end_point(problem, targets, end, lanczos_iters=7)})  # fmt: skip
    assert [p["class"] for p in land_exp.classify_points(points, cfg)] == ["global minimum"] * 3


def test_gram_spectrum_and_config_errors():
    problem, *_ = _factorization()
    out = land_exp.gram_spectrum(problem)  # J J^T = I (12 x 12)
    np.testing.assert_allclose(out["eigvals"], np.ones(12))
    assert out["cond"] == pytest.approx(1.0)
    rows = jnp.arange(1.0, 13.0)[:, None, None, None]
    scaled = problem._replace(jac={"w": problem.jac["w"] * rows})
    assert land_exp.gram_spectrum(scaled)["cond"] == pytest.approx(144.0)
    with pytest.raises(ConfigError, match="starts"):
        land_exp.LandscapeConfig(starts=0)
    with pytest.raises(ConfigError, match="grad_tol"):
        dataclasses.replace(land_exp.LandscapeConfig(), grad_tol=0.0)
