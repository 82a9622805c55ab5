"""ntk.diagnostics on closed forms: linear models (zero linearization error, constant kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax import lora
from lora_jax.errors import ConfigError
from ntk import _testing

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
        errors = ntk.linearization_error(f, w0, [w0, *steps], batch, eval_batch_size=2)
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


def test_shape_mismatches_are_config_errors():
    with pytest.raises(ConfigError, match="same examples"):
        ntk.prediction_agreement(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="same inputs with the same trace_axes"):
        ntk.kernel_distance(np.zeros((3, 3)), np.zeros((3, 3, 2, 2)))


def _tiny_lora():
    """A one-layer tanh model with LoRA on its ``query`` kernel, K = 3 outputs."""
    k = jax.random.split(jax.random.PRNGKey(4), 3)
    params = {
        "enc": {"query": {"kernel": jax.random.normal(k[0], (5, 6)) / 3, "bias": jnp.zeros(6)}},
        "head": {"kernel": jax.random.normal(k[1], (6, 3)) / 3, "bias": jnp.zeros(3)},
    }

    def output_fn(p, batch, dropout_rng=None):
        h = jnp.tanh(batch["x"] @ p["enc"]["query"]["kernel"] + p["enc"]["query"]["bias"])
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    cfg = lora.LoraConfig(r=2, alpha=4.0, targets=("query",))
    adapters0 = jax.tree.map(
        lambda a: a.astype(jnp.float64), lora.init(jax.random.PRNGKey(5), params, cfg)
    )
    adapters0["enc.query"]["lora_b"] = 0.2 * jax.random.normal(k[2], (2, 6))
    adapters = jax.tree.map(lambda a: a + 0.05, adapters0)
    return output_fn, params, cfg, adapters0, adapters


def test_ntk_regime_report_default_kernel_is_traced_and_choices_take_strings():
    """The report's default ``trace_axes`` is neural-tangents' ``(-1,)``: its kernel numbers
    are those of the traced hand-built J J^T; ``'logistic'`` / ``'adapters'`` (the enums'
    values) choose the logistic solver with ``diag_reg`` and the adapter linearization."""
    with jax.enable_x64():
        output_fn, params, cfg, adapters0, adapters = _tiny_lora()
        x = jax.random.normal(jax.random.PRNGKey(9), (14, 5))
        labels = jnp.arange(14, dtype=jnp.int32) % 3
        train = {"x": x[:8], "labels": labels[:8]}
        test = {"x": x[8:], "labels": labels[8:]}
        report = ntk.ntk_regime_report(
            output_fn,
            params,
            cfg,
            adapters0,
            adapters,
            train,
            test,
            kernel_solver="logistic",
            linearization="adapters",
            diag_reg=1e-2,
        )
        f, _, _ = ntk.lora_kernel_model(output_fn, params, adapters0, cfg)

        def traced(a, x1, x2=None):  # (N1, N2): nt's trace is a mean over the K outputs
            return np.einsum("abkk->ab", _testing.hand_ntk(f, a, x1, x2)) / 3

        k_tt0, k_tt1 = traced(adapters0, train), traced(adapters, train)
        want = ntk.kernel_distance(k_tt0, k_tt1)
        np.testing.assert_allclose(
            report["kernel_relative_change"], want["relative_change"], rtol=1e-8
        )
        np.testing.assert_allclose(report["kernel_alignment"], want["alignment"], rtol=1e-8)
        fit = ntk.kernel_logistic_regression(
            k_tt0,
            train["labels"],
            traced(adapters0, test, train),
            f(adapters0, train),
            f(adapters0, test),
            diag_reg=1e-2,
        )
        dist = ntk.prediction_agreement(fit.test, f(adapters, test))["relative_distance"]
        np.testing.assert_allclose(report["dist_trained_vs_kernel"], dist, rtol=1e-6)
        f_lin = ntk.linearize(f, adapters0)  # 'adapters': the expansion in the adapters
        lin = ntk.prediction_agreement(f_lin(adapters, test), f(adapters, test))
        np.testing.assert_allclose(
            report["dist_trained_vs_lin"], lin["relative_distance"], rtol=1e-8
        )
