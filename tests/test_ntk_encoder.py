"""ntk on the tiny encoder (2 layers, hidden 32): LoRA eNTK oracle and the NTK-regime report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax import lora, models
from lora_jax.readout import make_output_fn
from ntk import _testing

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LABEL_WORDS = np.array([5, 9])


def _encoder(dtype):
    cfg = models.EncoderConfig(
        model_type="roberta",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    apply_fn, params = models.split(models.create(cfg, head="mlm", dtype=dtype))
    return make_output_fn(apply_fn, "mlm", label_word_ids=LABEL_WORDS), params


def _batch(n, seed, t=6):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, size=(n, t)).astype(np.int32)
    ids[:, 0] = 0
    mask = np.ones((n, t), np.int32)
    mask[::2, -1] = 0  # some padding
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mask_pos": rng.integers(1, t - 1, n).astype(np.int32),
        "labels": (np.arange(n) % 2).astype(np.int32),
    }


def test_lora_entk_on_encoder_matches_hand_built_all_implementations():
    with jax.enable_x64():
        output_fn, params = _encoder(jnp.float64)
        cfg = lora.LoraConfig(r=2, alpha=4.0, targets=("query", "value"))
        adapters = lora.init(jax.random.PRNGKey(1), params, cfg)
        adapters = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.05, adapters)  # B != 0
        f, adapters, _ = ntk.lora_kernel_model(output_fn, params, adapters, cfg)
        x1, x2 = _batch(2, 0), _batch(2, 1)
        expected = _testing.hand_ntk(f, adapters, x1, x2)
        for implementation in (
            ntk.NtkImplementation.JACOBIAN_CONTRACTION,
            ntk.NtkImplementation.NTK_VECTOR_PRODUCTS,
            ntk.NtkImplementation.STRUCTURED_DERIVATIVES,
        ):
            got = ntk.empirical_ntk_fn(f, trace_axes=(), implementation=implementation)(
                x1, x2, adapters
            )
            assert got.shape == (2, 2, 2, 2) and got.dtype == np.float64
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_ntk_regime_report_small_learning_rate_is_lazy(tmp_path):
    output_fn, params = _encoder(jnp.float32)
    lcfg = lora.LoraConfig(r=2, alpha=4.0, targets=("query", "value"))
    adapters0 = lora.init(jax.random.PRNGKey(1), params, lcfg)
    tr, test = _batch(8, 2), _batch(8, 3)
    # "Trained" adapters: a small step away from init (lazy by construction); real and
    # linearized training through lora_jax.train are tested on MLPs in test_ntk_linearize.
    adapters = jax.tree.map(
        lambda a: a + 1e-3 * jax.random.normal(jax.random.PRNGKey(7), a.shape, a.dtype), adapters0
    )
    lin_adapters = jax.tree.map(lambda a: a * 1.01, adapters)
    report = ntk.ntk_regime_report(
        output_fn,
        params,
        lcfg,
        adapters0,
        adapters,
        tr,
        test,
        linearized_adapters=lin_adapters,
        checkpoints=[adapters0, adapters],
        kernel_batch_size=8,
        eval_batch_size=8,
        cache_dir=str(tmp_path),
    )
    assert report["agree_trained_vs_lin"] == 1.0 and report["dist_trained_vs_lin"] < 1e-3
    assert report["agree_trained_vs_lin_trained"] == 1.0
    assert 0 < report["weight_change_adapters"] < 0.1
    assert 0 < report["weight_change_adapted"] < 0.1 and report["weight_change_merged"] > 0
    assert report["linearization_error"][0] == 0.0  # at w0: 0 / 0
    assert report["linearization_error_end"] < 0.1
    assert report["kernel_alignment"] > 0.9 and report["kernel_relative_change"] >= 0
    for key in ("acc_trained", "acc_kernel", "acc_init", "agree_trained_vs_kernel"):
        assert 0.0 <= report[key] <= 1.0
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 2  # [train; test] x train, train x train
