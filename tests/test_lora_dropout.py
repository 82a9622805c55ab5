"""LoRA dropout (PEFT's `lora_dropout`) and the stacked q/k/v projection of the encoder.

The dropout oracle is PEFT's documented forward, `base(x) + lora_B(lora_A(dropout(x))) * scale`:
with square, invertible A and B the dropped-out input can be solved for exactly, and every one of
its entries must be either 0 or x / (1 - p), with about a fraction p of zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, readout, trainable
from lora_jax.models import create, split
from lora_jax.models.encoder import _DropoutKeys
from lora_jax.models.layers import dense, dense_stack

N = 16  # in = out = r, so that A @ B is invertible


def _square_setup(rate: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N, N)).astype(np.float32)
    b = rng.normal(size=(N,)).astype(np.float32)
    a = (np.eye(N) + 0.1 * rng.normal(size=(N, N))).astype(np.float32)
    bb = (np.eye(N) + 0.1 * rng.normal(size=(N, N))).astype(np.float32)
    params = {"enc": {"query": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}}
    cfg = lora.LoraConfig(r=N, alpha=N, targets=("query",), dropout=rate)  # scale 1
    adapters = {"enc.query": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(bb)}}
    x = rng.normal(size=(64, N)).astype(np.float32)
    return params, adapters, cfg, x, (w, b, a, bb)


def _dropped_input(params, adapters, cfg, x, rng):
    """Recovers dropout(x) from the layer output: (y - x W - b) / scale = dropout(x) A B."""
    p = lora.apply(params, adapters, cfg, dropout=True)["enc"]["query"]
    y = np.asarray(jax.jit(dense)(p, jnp.asarray(x), rng), np.float64)
    w, b = np.asarray(params["enc"]["query"]["kernel"]), np.asarray(params["enc"]["query"]["bias"])
    ab = np.asarray(adapters["enc.query"]["lora_a"], np.float64) @ np.asarray(
        adapters["enc.query"]["lora_b"], np.float64
    )
    low = y - x.astype(np.float64) @ w - b
    return low @ np.linalg.inv(ab)


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_dropout_hits_only_the_lora_input_with_inverted_scaling(rate):
    params, adapters, cfg, x, _ = _square_setup(rate)
    dropped = _dropped_input(params, adapters, cfg, x, jax.random.key(3))
    ratio = dropped / x  # each entry 0 (dropped) or 1 / (1 - rate) (kept, rescaled)
    kept = np.abs(ratio - 1.0 / (1.0 - rate)) < 1e-3
    zero = np.abs(ratio) < 1e-3
    assert np.all(kept | zero)
    frac = zero.mean()  # 1024 Bernoulli draws: std sqrt(p(1-p)/1024) <= 0.016
    assert abs(frac - rate) < 0.06, frac


def test_no_rng_or_zero_rate_is_the_plain_lora_layer():
    params, adapters, cfg, x, (w, b, a, bb) = _square_setup(0.5)
    oracle = x @ w + b + x @ a @ bb
    no_rate = lora.LoraConfig(r=N, alpha=N, targets=("query",))
    for p, rng in (
        (lora.apply(params, adapters, cfg)["enc"]["query"], jax.random.key(0)),  # eval
        (lora.apply(params, adapters, cfg, fusion="fused")["enc"]["query"], jax.random.key(0)),
        (lora.apply(params, adapters, no_rate, dropout=True)["enc"]["query"], jax.random.key(0)),
        (lora.apply(params, adapters, cfg, dropout=True)["enc"]["query"], None),  # no key
    ):
        np.testing.assert_allclose(np.asarray(dense(p, jnp.asarray(x), rng)), oracle, atol=2e-4)
    # The rate is a leaf of the adapted module; the key is an argument of the forward pass.
    q = lora.apply(params, adapters, cfg, dropout=True)["enc"]["query"]
    assert set(q) == {"kernel", "bias", "lora_a", "lora_b", "lora_scale", "lora_dropout"}
    assert q["lora_dropout"] == 0.5


def test_masks_are_deterministic_per_key_and_independent_per_module():
    params, adapters, cfg, x, _ = _square_setup(0.5)
    d1 = _dropped_input(params, adapters, cfg, x, jax.random.key(3))
    d2 = _dropped_input(params, adapters, cfg, x, jax.random.key(3))
    d3 = _dropped_input(params, adapters, cfg, x, jax.random.key(4))
    np.testing.assert_array_equal(d1 == 0, d2 == 0)
    assert np.mean((np.abs(d1) < 1e-4) != (np.abs(d3) < 1e-4)) > 0.2
    # The encoder hands each Linear call its own key: two calls under one model key differ.
    keys = _DropoutKeys(jax.random.key(3))
    first, second = keys.lora(), keys.lora()
    d4 = _dropped_input(params, adapters, cfg, x, first)
    d5 = _dropped_input(params, adapters, cfg, x, second)
    assert np.mean((np.abs(d4) < 1e-4) != (np.abs(d5) < 1e-4)) > 0.2


def test_dropout_forces_the_fused_path_and_gradients_see_the_mask():
    params, adapters, cfg, x, _ = _square_setup(0.5)
    p = lora.apply(params, adapters, cfg, fusion="merged", dropout=True)
    assert "lora_a" in p["enc"]["query"]  # not merged: a merged kernel cannot drop inputs
    np.testing.assert_array_equal(p["enc"]["query"]["kernel"], params["enc"]["query"]["kernel"])

    def loss(ad):
        q = lora.apply(params, ad, cfg, dropout=True)["enc"]["query"]
        return dense(q, jnp.asarray(x), jax.random.key(3)).sum()

    g = jax.grad(loss)(adapters)["enc.query"]["lora_b"]
    # d/dB of sum(dropout(x) A B) = (dropout(x) A)^T 1: built from the recovered dropped input.
    dropped = _dropped_input(params, adapters, cfg, x, jax.random.key(3))
    oracle = (dropped @ np.asarray(adapters["enc.query"]["lora_a"])).T @ np.ones((64, N))
    np.testing.assert_allclose(np.asarray(g), oracle, rtol=1e-3, atol=1e-3)


def test_dropout_rate_is_validated_and_round_trips_through_files(tmp_path):
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="LoraConfig.dropout"):
            lora.LoraConfig(dropout=bad)
    cfg = lora.LoraConfig(r=2, alpha=4, dropout=0.1)
    assert lora.config_from_dict(lora.config_to_dict(cfg)) == cfg
    assert lora.to_peft_config(cfg, ["a.query"])["lora_dropout"] == 0.1
    assert lora.from_peft_config(lora.to_peft_config(cfg, ["a.query"])).dropout == 0.1


@pytest.fixture(scope="module")
def tiny_encoder(tiny_encoder_config):
    config = dataclasses.replace(
        tiny_encoder_config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return split(create(config, head=None, seed=0))


def test_lora_dropout_in_a_model_fn_runs_only_with_a_key(tiny_encoder):
    apply_fn, params = tiny_encoder
    out_fn = readout.make_output_fn(apply_fn, "tied_mean", jnp.asarray([5, 7]))
    batch = {
        "input_ids": jnp.asarray(np.random.default_rng(0).integers(3, 50, size=(4, 9)), jnp.int32),
        "attention_mask": jnp.ones((4, 9), jnp.int32),
    }
    rng = jax.random.key(0)
    outs = {}
    for rate in (0.0, 0.3):
        cfg = lora.LoraConfig(r=2, alpha=4, dropout=rate)
        ad = jax.tree.map(lambda t: t + 0.3, lora.init(jax.random.key(1), params, cfg))
        fn = jax.jit(trainable.make_model_fn(out_fn, "lora", lora_config=cfg))
        outs[rate] = (fn(ad, params, batch, None), fn(ad, params, batch, rng))
    # Model dropout is 0 in this config, so only LoRA dropout can change the outputs.
    np.testing.assert_allclose(outs[0.0][1], outs[0.0][0], atol=1e-6)
    np.testing.assert_allclose(outs[0.3][0], outs[0.0][0], atol=1e-6)
    assert np.abs(np.asarray(outs[0.3][1] - outs[0.3][0])).max() > 1e-3


def test_lora_dropout_leaves_the_models_own_masks_unchanged(tiny_encoder_config):
    """With B = 0 (PEFT's init) the LoRA term is zero whatever its mask, so the outputs under a
    key equal those of the bare model under the same key only if its own masks are unchanged."""
    config = dataclasses.replace(tiny_encoder_config, hidden_dropout_prob=0.2)
    apply_fn, params = split(create(config, head=None, seed=0))
    out_fn = readout.make_output_fn(apply_fn, "tied_mean", jnp.asarray([5, 7]))
    batch = {
        "input_ids": jnp.asarray(np.random.default_rng(0).integers(3, 50, size=(4, 9)), jnp.int32),
        "attention_mask": jnp.ones((4, 9), jnp.int32),
    }
    cfg = lora.LoraConfig(r=2, alpha=4, dropout=0.5, targets=("query", "value", "dense"))
    fn = jax.jit(trainable.make_model_fn(out_fn, "lora", lora_config=cfg))
    ad = lora.init(jax.random.key(1), params, cfg)
    rng = jax.random.key(0)
    bare = out_fn(params, batch, rng)
    np.testing.assert_allclose(np.asarray(fn(ad, params, batch, rng)), np.asarray(bare), atol=1e-5)
    assert np.abs(np.asarray(bare - out_fn(params, batch, None))).max() > 1e-3  # masks are on


def test_dense_stack_equals_separate_dense_layers():
    rng = np.random.default_rng(0)
    ps = []
    for i in range(3):
        p = {
            "kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        }
        if i != 1:  # LoRA on the first and last only, as on query/value
            p |= {
                "lora_a": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
                "lora_b": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32),
                "lora_scale": jnp.asarray(0.5, jnp.float32),
            }
        ps.append(p)
    x = rng.normal(size=(2, 3, 6)).astype(np.float32)
    got = dense_stack(ps, jnp.asarray(x))
    for p, y in zip(ps, got, strict=True):
        want = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
        if "lora_a" in p:
            want = want + 0.5 * x @ np.asarray(p["lora_a"]) @ np.asarray(p["lora_b"])
        assert y.shape == (2, 3, 5)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def _check_gelu():
    from lora_jax.models.layers import gelu_exact

    x = jnp.linspace(-6.0, 6.0, 241, dtype=jnp.float64)
    np.testing.assert_allclose(gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=1e-15)
    ours = jax.vmap(jax.grad(gelu_exact))(x)
    ref = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
    np.testing.assert_allclose(ours, ref, atol=1e-14)


def _check_layer_norm():
    from lora_jax.models.layers import layer_norm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float64)
    p = {"scale": jnp.asarray(rng.normal(size=7)), "bias": jnp.asarray(rng.normal(size=7))}
    w = jnp.asarray(rng.normal(size=(3, 5, 7)))

    def reference(p, x):  # the textbook formula, differentiated by JAX
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    got = jax.grad(lambda p, x: (layer_norm(p, x, 1e-5) * w).sum(), argnums=(0, 1))(p, x)
    want = jax.grad(lambda p, x: (reference(p, x) * w).sum(), argnums=(0, 1))(p, x)
    np.testing.assert_allclose(layer_norm(p, x, 1e-5), reference(p, x), atol=1e-12)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_gelu_exact_and_its_hand_written_gradient_match_jax_nn_gelu():
    with jax.enable_x64(True):
        _check_gelu()


def test_layer_norm_hand_written_gradient_matches_autodiff_of_the_formula():
    with jax.enable_x64(True):
        _check_layer_norm()
