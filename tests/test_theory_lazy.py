"""experiments.lazy: oracles are a model linear in its weights (no linearization error, no
kernel movement), the Taylor remainder (the relative error grows like ||dW||) and hand sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lazy
from lora_jax import lora
from lora_jax.errors import ConfigError
from ntk._testing import mlp


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64():
        yield


def _setup(sizes, targets):
    f, params = mlp(jax.random.key(0), sizes=sizes)
    output_fn = lambda p, b, dropout_rng=None: f(p, b)  # noqa: E731
    cfg = lora.LoraConfig(r=2, alpha=3.0, targets=targets)
    batch = {"x": jax.random.normal(jax.random.key(1), (6, sizes[0]), jnp.float64)}
    a0 = lora.init(jax.random.key(3), params, cfg)  # B = 0

    def trained(t):  # B = t B1: dW = t scale A B1
        return jax.tree.map(
            lambda x: t * jax.random.normal(jax.random.key(2), x.shape, x.dtype) if x.shape[0]
            == 2 else x, a0)  # fmt: skip

    return output_fn, params, cfg, batch, a0, trained


def test_a_model_linear_in_its_weights_is_lazy_whatever_it_moves():
    output_fn, params, cfg, batch, a0, trained = _setup((5, 3), "layer0")
    out = lazy.measure(output_fn, params, cfg, a0, trained(1.0), batch)
    assert out["linearization_error"] < 1e-12 and out["output_change"] > 0.1
    assert out["weight_kernel"]["relative_change"] < 1e-12
    # The adapter kernel moves anyway: at B = 0 it sees only the B directions.
    assert out["adapter_kernel"]["relative_change"] > 0.1
    # ||dW|| / ||W0|| by hand
    w = params["layer0"]["kernel"]
    dw = 1.5 * trained(1.0)["layer0"]["lora_a"] @ trained(1.0)["layer0"]["lora_b"]
    assert out["weight_change"] == pytest.approx(float(jnp.linalg.norm(dw) / jnp.linalg.norm(w)))


def test_linearization_error_grows_like_the_weight_change():
    # f(W0 + dW) - f_lin(dW) = O(||dW||^2) against a change O(||dW||): the ratio doubles with dW.
    output_fn, params, cfg, batch, a0, trained = _setup((5, 8, 3), "layer0|layer1")
    small = lazy.measure(output_fn, params, cfg, a0, trained(1e-3), batch)
    double = lazy.measure(output_fn, params, cfg, a0, trained(2e-3), batch)
    assert 1e-6 < small["linearization_error"] < 1e-2
    assert double["linearization_error"] / small["linearization_error"] == pytest.approx(
        2, rel=0.05
    )
    assert double["weight_change"] == pytest.approx(2 * small["weight_change"], rel=1e-9)
    assert small["weight_kernel"]["relative_change"] < small["adapter_kernel"]["relative_change"]


def test_pure_parts_by_hand_and_config_errors():
    y0, y = np.zeros((2, 2)), np.array([[3.0, 0.0], [0.0, 4.0]])
    assert lazy.linearization_error(y, y + np.array([[0.5, 0], [0, 0]]), y0) == pytest.approx(0.1)
    assert lazy.linearization_error(y0, y0, y0) == 0.0
    w0 = {"a": np.full((2, 2), 2.0), "b": np.ones(3)}
    assert lazy.weight_change(w0, {"a": np.full((2, 2), 1.0)}) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="ranks"):
        lazy.LazyConfig(ranks=(0,))
