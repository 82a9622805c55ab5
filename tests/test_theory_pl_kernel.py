"""The LoRA tangent kernel along a PL run: oracles are the empirical NTK of the linearized LoRA
model (ntk's public API), the autodiff gradient, and a projector's eigenvalues."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from experiments import pl as pl_exp
from lora_jax import lora
from ntk._testing import mlp
from ntk.theory import pl, sensing


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64():
        yield


def _problem(n=6, k=3, dtype=jnp.float64):
    f, params = mlp(jax.random.key(0), sizes=(5, 8, k), dtype=dtype)
    output_fn = lambda p, b, dropout_rng=None: f(p, b)  # noqa: E731
    cfg = lora.LoraConfig(r=2, alpha=3.0, targets="layer0|layer1")
    batch = {"x": jax.random.normal(jax.random.key(1), (n, 5), dtype)}
    adapters = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape, x.dtype),
        lora.init(jax.random.key(3), params, cfg),
    )
    problem = sensing.lora_jacobians(output_fn, params, cfg, batch, chunk=4)
    return problem, adapters, output_fn, params, cfg, batch


def test_tangent_kernel_is_the_empirical_ntk_of_the_linearized_lora_model():
    problem, adapters, output_fn, params, cfg, batch = _problem()
    lin = ntk.lora_linearized_model_fn(output_fn, cfg)
    ntk_fn = ntk.empirical_ntk_fn(lambda a, x: lin(a, params, x), trace_axes=())
    expected = ntk.kernel_matrix(np.asarray(ntk_fn(batch, None, adapters)))  # (NK, NK)
    got = sensing.tangent_kernel(problem, adapters)
    assert got.shape == (18, 18)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_cross_entropy_gradient_is_the_kernel_quadratic_form_and_its_bound():
    # ||grad L||^2 = e^T Theta e / N^2 with e = softmax(f) - onehot(y) (L the mean over N), and
    # e sums to zero per example, so ||grad L||^2 >= lam_min(subspace) ||e||^2 / N^2.
    problem, adapters, *_ = _problem()
    n, k = problem.f0.shape
    labels = jnp.array([0, 1, 2, 0, 1, 2])

    def loss(a):
        out = sensing.outputs(problem, a)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1))

    g = jax.grad(loss)(adapters)
    grad_sq = sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(g))
    theta = sensing.tangent_kernel(problem, adapters)
    e = np.asarray(jax.nn.softmax(sensing.outputs(problem, adapters)) - jax.nn.one_hot(labels, k))
    e = e.reshape(-1)
    assert grad_sq == pytest.approx(e @ theta @ e / n**2, rel=1e-10)
    eig = sensing.residual_subspace_eigvals(theta, k)
    assert eig.shape == (n * (k - 1),)
    assert grad_sq >= eig[0] * (e @ e) / n**2 * (1 - 1e-10)
    # kernel_along's bound is that one, divided by L (it must not exceed the true ratio).
    rows = pl_exp.kernel_along(
        problem, labels, np.array([0]), jax.tree.map(lambda x: x[None], adapters)
    )
    ratio = np.sqrt(grad_sq) / float(loss(adapters))
    assert rows[0]["loss"] == pytest.approx(float(loss(adapters)), rel=1e-10)
    assert rows[0]["c_kernel"] == pytest.approx(np.sqrt(eig[0] * (e @ e)) / n / rows[0]["loss"])
    assert rows[0]["c_kernel"] <= ratio
    assert rows[0]["lam_min"] == pytest.approx(eig[0]) and rows[0]["lam_max"] == eig[-1]


def test_residual_subspace_eigenvalues_are_those_of_the_projected_kernel():
    rng = np.random.default_rng(0)
    n, k = 4, 3
    x = rng.normal(size=(n * k, 7))
    theta = x @ x.T
    proj = np.kron(np.eye(n), np.eye(k) - 1.0 / k)  # onto residuals summing to 0 per example
    full = np.linalg.eigvalsh(proj @ theta @ proj)  # N zeros, then the subspace's eigenvalues
    got = sensing.residual_subspace_eigvals(theta, k)
    np.testing.assert_allclose(np.sort(got), np.sort(full)[n:], rtol=1e-10, atol=1e-10)
    assert np.abs(np.sort(full)[:n]).max() < 1e-10


def test_trajectory_keeps_the_iterates_at_the_asked_steps():
    # L(x) = 0.5 x^2, lr = 0.1: x_t = 0.9^t; stopping at L <= 1e-3 (t = 30) drops step 500.
    def loss(p, data):
        return 0.5 * data * p["x"] ** 2

    traj = pl.trajectory(loss, {"x": jnp.ones(())}, 1.0, steps=600, learning_rate=0.1,
                         stop_below=1e-3, keep_steps=(500, 0, 3, 30, 3))  # fmt: skip
    np.testing.assert_array_equal(traj.kept_steps, [0, 3, 30])
    np.testing.assert_allclose(traj.kept["x"], 0.9 ** np.array([0, 3, 30]), rtol=1e-5)
    assert pl.trajectory(loss, {"x": jnp.ones(())}, 1.0, steps=5, learning_rate=0.1).kept is None


def test_log_steps_and_kernel_numbers_after_the_plateau():
    steps = pl_exp.log_steps(1000, 10)
    assert steps[0] == 0 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert pl_exp.log_steps(1000, 0) == []
    rows = [
        {"step": 0, "lam_min": 1e-9, "lam_max": 1.0, "c_kernel": 1e-4},  # on the plateau
        {"step": 50, "lam_min": 0.2, "lam_max": 1.0, "c_kernel": 0.5},  # last before its end
        {"step": 200, "lam_min": 0.5, "lam_max": 2.0, "c_kernel": 0.3},
        {"step": 900, "lam_min": 0.4, "lam_max": 4.0, "c_kernel": None},
    ]
    out = pl_exp.kernel_numbers(rows, plateau_end=100)
    assert out == {"kernel_rel_min": 0.1, "kernel_lam_min": 0.2, "c_kernel_min": 0.3}
    assert pl_exp.kernel_numbers([], 100)["kernel_rel_min"] is None
