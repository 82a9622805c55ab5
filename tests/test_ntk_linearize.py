"""ntk.linearize & co.: exact first-order Taylor models, trained by lora_jax.train's own loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntk
from lora_jax import lora, programs, train
from ntk import _testing

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOL64 = _testing.tolerance(np.float64)


def _data(n=8, d=5, k=3, seed=1, dtype=jnp.float64):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)
    return {"x": x, "labels": jnp.arange(n, dtype=jnp.int32) % k}


def test_linearize_is_f0_plus_jacobian_times_delta():
    with jax.enable_x64():
        f, p0 = _testing.mlp(jax.random.PRNGKey(0))
        batch = _data()
        flat0, unravel = ravel_pytree(p0)
        dp = 0.3 * jax.random.normal(jax.random.PRNGKey(2), flat0.shape, jnp.float64)
        jac = jax.jit(jax.jacfwd(lambda w: f(unravel(w), batch)))(flat0)  # (N, K, P)
        expected = f(p0, batch) + jnp.einsum("nkp,p->nk", jac, dp)
        got = jax.jit(ntk.linearize(f, p0))(unravel(flat0 + dp), batch)
        np.testing.assert_allclose(got, expected, **TOL64)


def test_linearization_error_is_second_order():
    with jax.enable_x64():
        f, p0 = _testing.mlp(jax.random.PRNGKey(0))
        batch = _data()
        f_lin = ntk.linearize(f, p0)
        direction = jax.tree.map(lambda a: jnp.ones_like(a) / 3, p0)
        errs = []
        for eps in (1e-2, 1e-3, 1e-4):
            p = jax.tree.map(lambda a, d: a + eps * d, p0, direction)  # noqa: B023
            errs.append(float(jnp.linalg.norm(f(p, batch) - f_lin(p, batch))))
        assert 50 < errs[0] / errs[1] < 200 and 50 < errs[1] / errs[2] < 200  # O(|dw|^2)


def _cfg(**kw):
    base = dict(steps=12, eval_every=12, batch_size=4, learning_rate=0.05, loss="mse")
    return train.TrainConfig(**(base | kw))


def _run(model_fn, trainable0, frozen, data, cfg):
    opt = train.make_optimizer(cfg)
    chunk = programs.make_train_chunk(model_fn, opt, cfg)
    # The chunk donates its state: train a copy, so trainable0 (inside frozen) stays alive.
    state0 = train.init_state(jax.tree.map(jnp.copy, trainable0), opt, seed=3)
    state, losses = chunk(state0, frozen, data)
    return state.trainable, losses


def test_linear_model_real_and_linearized_training_identical():
    with jax.enable_x64():
        data = _data()
        params0 = {"w": 0.1 * jnp.ones((5, 3), jnp.float64), "b": jnp.zeros(3, jnp.float64)}

        def model_fn(p, frozen, batch, rng):  # linear in p
            del frozen, rng
            return batch["x"] @ p["w"] + p["b"]

        cfg = _cfg(optimizer="adamw", loss="ce", max_grad_norm=1.0)
        real, real_losses = _run(model_fn, params0, {}, data, cfg)
        lin, lin_losses = _run(ntk.linearized_model_fn(model_fn), params0, (params0, {}), data, cfg)
        np.testing.assert_allclose(real_losses, lin_losses, **TOL64)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL64), real, lin)
        assert not np.allclose(real["w"], params0["w"])  # it did train


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_linearized_full_batch_gd_equals_function_space_gd(loss):
    # The linearized model trained by full-batch SGD is exactly kernel GD with its eNTK.
    with jax.enable_x64():
        f, p0 = _testing.mlp(jax.random.PRNGKey(0))
        data, test = _data(n=6), _data(n=4, seed=7)

        def model_fn(p, frozen, batch, rng):
            del frozen, rng
            return f(p, batch)

        cfg = _cfg(batch_size=6, optimizer="sgd", max_grad_norm=None, loss=loss, learning_rate=0.5)
        lin_fn = ntk.linearized_model_fn(model_fn)
        trained, _ = _run(lin_fn, p0, (p0, None), data, cfg)
        k_tt = _testing.hand_ntk(f, p0, data)
        k_st = _testing.hand_ntk(f, p0, test, data)
        preds = ntk.function_space_gd(
            k_tt,
            data["labels"],
            k_st,
            f(p0, data),
            f(p0, test),
            steps=cfg.steps,
            learning_rate=cfg.learning_rate,
            loss=loss,
        )
        lin = jax.jit(lin_fn)
        np.testing.assert_allclose(lin(trained, (p0, None), data), preds.train, **TOL64)
        np.testing.assert_allclose(lin(trained, (p0, None), test), preds.test, **TOL64)


def _lora_setup(dtype=jnp.float64):
    k = jax.random.split(jax.random.PRNGKey(4), 4)
    params = {
        "enc": {
            "query": {
                "kernel": jax.random.normal(k[0], (5, 6), dtype) / 3,
                "bias": jnp.zeros(6, dtype),
            }
        },
        "head": {"kernel": jax.random.normal(k[1], (6, 3), dtype) / 3, "bias": jnp.zeros(3, dtype)},
    }

    def output_fn(p, batch, dropout_rng=None):
        h = jnp.tanh(batch["x"] @ p["enc"]["query"]["kernel"] + p["enc"]["query"]["bias"])
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    cfg = lora.LoraConfig(r=2, alpha=4.0, targets=("query",))
    adapters = lora.init(jax.random.PRNGKey(5), params, cfg)
    adapters = jax.tree.map(lambda a: a.astype(dtype), adapters)
    b = 0.2 * jax.random.normal(k[2], adapters["enc.query"]["lora_b"].shape, dtype)
    adapters["enc.query"]["lora_b"] = b
    return params, output_fn, cfg, adapters


def test_lora_linearized_model_is_linear_in_w():
    with jax.enable_x64():
        params, output_fn, cfg, adapters = _lora_setup()
        batch = _data()
        w0 = params["enc"]["query"]["kernel"]

        def f_of_w(w):
            p = {
                "enc": {"query": {"kernel": w, "bias": params["enc"]["query"]["bias"]}},
                "head": params["head"],
            }
            return output_fn(p, batch)

        jac_w = jax.jit(jax.jacfwd(f_of_w))(w0)  # (N, K, in, out)
        scale = 4.0 / 2
        dw = scale * adapters["enc.query"]["lora_a"] @ adapters["enc.query"]["lora_b"]
        expected = f_of_w(w0) + jnp.einsum("nkio,io->nk", jac_w, dw)
        lin_fn = ntk.lora_linearized_model_fn(output_fn, cfg)
        np.testing.assert_allclose(jax.jit(lin_fn)(adapters, params, batch), expected, **TOL64)
        w0_flat, delta = ntk.lora_weight_delta(params, adapters, cfg)
        assert list(delta) == ["enc.query.kernel"]
        np.testing.assert_allclose(delta["enc.query.kernel"], dw, **TOL64)


def test_kernel_model_subsets_and_errors():
    with jax.enable_x64():
        params, output_fn, cfg, adapters = _lora_setup()
        batch = _data()
        full = output_fn(params, batch)
        f, sub, _ = ntk.kernel_model(output_fn, params, r"query\.kernel$")
        assert list(sub) == ["enc"] and list(sub["enc"]["query"]) == ["kernel"]
        np.testing.assert_allclose(f(sub, batch), full)
        f, sub, _ = ntk.kernel_model(output_fn, params, "all")
        np.testing.assert_allclose(f(sub, batch), full)
        f, sub, _ = ntk.lora_kernel_model(output_fn, params, adapters, cfg)
        np.testing.assert_allclose(
            f(sub, batch), output_fn(lora.apply(params, adapters, cfg), batch)
        )
        with pytest.raises(ValueError, match="selects no parameter.*enc.query.kernel"):
            ntk.kernel_model(output_fn, params, "attention")
        bad, sub, _ = ntk.kernel_model(lambda p, b: output_fn(p, b)[:, 0], params)
        with pytest.raises(ValueError, match=r"shape \[N, K\]; got shape \(8,\)"):
            bad(sub, batch)
    with pytest.raises(ValueError, match="enable_x64"):
        ntk.kernel_model(output_fn, params, dtype=jnp.float64)


@pytest.mark.parametrize("model_type", ["roberta", "deberta-v2"])
def test_lora_linearized_model_through_the_factors_is_the_dense_jvp(model_type):
    """``fusion='fused'`` (the tangent as ``d/dt f(W0 + t s A B)`` through ``(x A) B``) equals
    the dense formula ``f(W0) + J_W(W0) . delta``, written here as a JVP over the base leaves in
    the direction of ``s A @ B`` (kernels) and ``adapter - base`` (trainable biases), on a tiny
    encoder with B != 0, with and without the model's dropout."""
    from lora_jax import models
    from lora_jax import params as params_lib
    from lora_jax.readout import make_output_fn

    config = models.EncoderConfig(
        model_type=model_type, vocab_size=50, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=24, max_position_embeddings=40,
        type_vocab_size=1 if model_type == "roberta" else 0, pad_token_id=1,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, 50, size=(6, 8)).astype(np.int32),
        "attention_mask": np.ones((6, 8), np.int32),
    }
    with jax.enable_x64():
        model = models.create(config, head="cls", num_labels=3, seed=0, dtype=jnp.float64)
        apply_fn, params = models.split(model)
        output_fn = make_output_fn(apply_fn, "cls")
        cfg = lora.LoraConfig(r=2, alpha=6.0, targets="query|value|dense", bias="lora_only")
        adapters = jax.tree.map(
            lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape, a.dtype),
            lora.init(jax.random.key(0), params, cfg),
        )
        flat = params_lib.flatten(params)
        w0, delta = {}, {}
        for path, leaves in adapters.items():
            assert set(leaves) == {"lora_a", "lora_b", "bias"}
            w0[f"{path}.kernel"] = flat[f"{path}.kernel"]
            delta[f"{path}.kernel"] = 3.0 * leaves["lora_a"] @ leaves["lora_b"]  # alpha / r
            w0[f"{path}.bias"] = flat[f"{path}.bias"]
            delta[f"{path}.bias"] = leaves["bias"] - flat[f"{path}.bias"]

        def reference(dropout_rng):
            def f(sub):
                p = params_lib.unflatten({**flat, **sub})
                return output_fn(p, batch, dropout_rng)

            y0, dy = jax.jvp(f, (w0,), (delta,))
            return y0 + dy

        for rng_key in (None, jax.random.key(7)):
            expected = reference(rng_key)
            assert not np.allclose(expected, output_fn(params, batch, rng_key), atol=1e-3)
            lin_fn = ntk.lora_linearized_model_fn(output_fn, cfg, fusion="fused")
            got = jax.jit(lin_fn)(adapters, params, batch, rng_key)
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
