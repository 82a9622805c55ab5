"""ntk.diagnostics on closed forms: linear models (zero linearization error, constant kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_prediction_agreement():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0], [0.0, 4.0]])
    got = ntk.prediction_agreement(a, b)
    assert got["argmax_agreement"] == 0.75
    np.testing.assert_allclose(got["relative_distance"], np.sqrt(3.0) / np.sqrt(23.0))
    assert ntk.prediction_agreement(b, b) == {"argmax_agreement": 1.0, "relative_distance": 0.0}
    with pytest.raises(ValueError, match="one shape"):
        ntk.prediction_agreement(a, b[:2])


def test_kernel_distance_closed_forms():
    k0 = np.random.default_rng(0).normal(size=(4, 4, 2, 2))
    same = ntk.kernel_distance(k0, k0)
    assert same["relative_change"] == 0.0 and np.isclose(same["alignment"], 1.0)
    scaled = ntk.kernel_distance(k0, 3.0 * k0)  # a rescaled kernel: change 2, alignment 1
    np.testing.assert_allclose([scaled["relative_change"], scaled["alignment"]], [2.0, 1.0])
    other = np.zeros_like(k0)
    other[0, 0, 0, 0] = 1.0
    k1 = np.zeros_like(k0)
    k1[1, 1, 1, 1] = 1.0
    assert ntk.kernel_distance(other, k1)["alignment"] == 0.0


def test_relative_weight_change():
    w0 = {"a": np.array([3.0, 0.0]), "b": {"c": np.array([[4.0]])}}
    w1 = {"a": np.array([3.0, 1.0]), "b": {"c": np.array([[4.0]])}}
    assert ntk.relative_weight_change(w1, w0) == pytest.approx(1.0 / 5.0)
    assert ntk.relative_weight_change(w0, w0) == 0.0


def test_linear_model_has_zero_linearization_error_and_constant_kernel():
    with jax.enable_x64():
        rng = np.random.default_rng(0)
        batch = {"x": jnp.asarray(rng.normal(size=(5, 4)))}
        f = lambda p, b: b["x"] @ p["w"] + p["b"]  # noqa: E731
        w0 = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.zeros(3)}
        steps = [jax.tree.map(lambda a, s=s: a + s, w0) for s in (0.1, 1.0, 5.0)]
        errors = ntk.linearization_error(f, w0, [w0, *steps], batch, batch_size=2)
        assert errors.shape == (4,) and errors[0] == 0.0  # 0 / 0 at w0 reads 0
        np.testing.assert_allclose(errors, 0.0, atol=1e-14)
        ntk_fn = ntk.empirical_ntk_fn(f, trace_axes=())
        dist = ntk.kernel_distance(ntk_fn(batch, None, w0), ntk_fn(batch, None, steps[-1]))
        assert dist["relative_change"] < 1e-14 and abs(dist["alignment"] - 1) < 1e-14


def test_nonlinear_model_linearization_error_grows():
    rng = np.random.default_rng(1)
    batch = {"x": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    f = lambda p, b: jnp.tanh(b["x"] @ p)  # noqa: E731
    w0 = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    errs = ntk.linearization_error(f, w0, [w0 + 1e-2, w0 + 1e-1, w0 + 1.0], batch)
    assert errs[0] < errs[1] < errs[2] and errs[0] < 0.05
