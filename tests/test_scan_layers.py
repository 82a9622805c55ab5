"""Encoders of SCAN_MIN_LAYERS layers or more run their layers under one lax.scan: the same
outputs, gradients and dropout masks as the unrolled loop (the oracle), and one compiled body."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, models
from lora_jax.models import encoder


def _problem(model_type: str, layers: int):
    config = models.EncoderConfig(
        model_type=model_type, vocab_size=40, hidden_size=16, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=24, max_position_embeddings=20,
        type_vocab_size=2, pad_token_id=1, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    apply_fn, params = models.split(models.create(config, head="mlm", seed=0))
    lcfg = lora.LoraConfig(r=2, alpha=4, targets="query|value", dropout=0.1)
    adapters = lora.init(jax.random.key(1), params, lcfg)
    adapters = jax.tree.map(lambda a: a + 0.05, adapters)  # B != 0: the LoRA branch counts
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 40, size=(3, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [7], [4]]), jnp.int32)
    pos = jnp.asarray([2, 5, 1], jnp.int32)

    def loss(adapters, dropout_rng):
        p = lora.apply(params, adapters, lcfg, fusion="fused", dropout=dropout_rng is not None)
        out = apply_fn(p, ids, mask, mask_positions=pos, label_word_ids=jnp.asarray([4, 9]),
                       dropout_rng=dropout_rng)  # fmt: skip
        return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), adapters


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_scan_equals_the_unrolled_layers(model_type, monkeypatch):
    layers = 4  # the threshold lowered to 4 layers (cheap to compile): 3 scanned, the last not
    results, loops = {}, {}
    for scan in (True, False):
        monkeypatch.setattr(encoder, "SCAN_MIN_LAYERS", layers if scan else layers + 1)
        fn, adapters = _problem(model_type, layers)
        for rng in (None, jax.random.key(7)):
            (value, out), grads = fn(adapters, rng)
            results[scan, rng is None] = (out, grads)
            loops[scan, rng is None] = fn.lower(adapters, rng).as_text().count("stablehlo.while")
    assert loops[True, True] > loops[False, True] and loops[True, False] > loops[False, False]
    for no_dropout in (True, False):
        (out_s, g_s), (out_u, g_u) = results[True, no_dropout], results[False, no_dropout]
        np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # dropout ran (masks differ from no dropout), and with the same masks in both loops
    assert not np.allclose(results[True, True][0], results[True, False][0])


def test_layers_of_different_shapes_stay_unrolled():
    layer = {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 2))}
    other = {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 3))}  # another rank
    plain = {"kernel": jnp.zeros((4, 4))}  # no LoRA on this layer
    n = encoder.SCAN_MIN_LAYERS - 1
    assert encoder._scannable([layer] * n)
    assert not encoder._scannable([layer] * (n - 1))  # too few layers
    assert not encoder._scannable([layer] * (n - 1) + [other])
    assert not encoder._scannable([layer] * (n - 1) + [plain])
