"""ntk._compat: neural-tangents imports on current jax and its eNTK matches a hand-built J J^T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk import _testing
from ntk._compat import nt, patched_names

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_import_and_patched_names():
    assert nt.__version__ == "0.6.5"
    for name in ("empirical_ntk_fn", "linearize", "batch", "predict", "NtkImplementation"):
        assert hasattr(nt, name)
    # Only names jax lacked were added; the stubbed tensorflow port is an empty module.
    assert "neural_tangents.experimental" in patched_names
    assert not hasattr(nt.experimental, "empirical_ntk_fn_tf")
    for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive"):
        assert getattr(jax.core, name) is getattr(jax.extend.core, name)


@pytest.mark.parametrize(
    "implementation",
    [
        nt.NtkImplementation.JACOBIAN_CONTRACTION,
        nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    ],
)
def test_nt_empirical_ntk_matches_hand_built(implementation):
    with jax.enable_x64():
        f, params = _testing.mlp(jax.random.PRNGKey(0), (4, 6, 5, 3))
        g = lambda p, x: f(p, {"x": x})  # noqa: E731
        x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 4), jnp.float64)
        x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 4), jnp.float64)
        expected = _testing.hand_ntk(f, params, {"x": x1}, {"x": x2})  # (5, 3, K, K)
        got = nt.empirical_ntk_fn(g, trace_axes=(), implementation=implementation)(x1, x2, params)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, **_testing.tolerance(np.float64))
    assert not jax.config.jax_enable_x64  # the context did not leak


def test_nt_linearize_and_predict_run():
    with jax.enable_x64():
        f, params = _testing.mlp(jax.random.PRNGKey(0))
        g = lambda p, x: f(p, {"x": x})  # noqa: E731
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 5), jnp.float64)
        np.testing.assert_allclose(nt.linearize(g, params)(params, x), g(params, x))
        k = nt.empirical_ntk_fn(g)(x, None, params)
        y = jnp.eye(3)[jnp.array([0, 1, 2, 0])]
        fx = nt.predict.gradient_descent_mse(k, y)(None, 0.0)
        np.testing.assert_allclose(fx, y)
