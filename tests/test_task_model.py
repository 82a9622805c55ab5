"""Readouts of the K outputs against the full model outputs, and the trainable splits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, models
from lora_jax import params as params_lib
from lora_jax.readout import make_output_fn
from lora_jax.testing import make_tiny_checkpoint
from lora_jax.trainable import Method, make_model_fn, split_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tm") / "roberta")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.int32)
    mask[1, 7:] = 0  # padding in the batch
    ids[1, 7:] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "mask_pos": np.array([2, 5, 9], np.int32)}
    return path, batch, np.array([11, 42], np.int32)


def test_mlm_readout_is_the_full_logits_at_mask_for_label_words(tiny):
    path, batch, words = tiny
    apply_fn, params = models.split(models.from_pretrained(path, head="mlm"))
    full = np.asarray(apply_fn(params, batch["input_ids"], batch["attention_mask"]))  # (B, T, V)
    expected = full[np.arange(3), batch["mask_pos"]][:, words]
    out = make_output_fn(apply_fn, "mlm", words)(params, batch)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("readout", ["tied", "tied_mean"])
def test_tied_readouts_match_numpy(tiny, readout):
    path, batch, words = tiny
    apply_fn, params = models.split(models.from_pretrained(path, head=None))
    states = np.asarray(apply_fn(params, batch["input_ids"], batch["attention_mask"]))
    if readout == "tied":
        hidden = states[np.arange(3), batch["mask_pos"]]
    else:
        m = batch["attention_mask"][..., None]
        hidden = (states * m).sum(1) / m.sum(1)
    emb = np.asarray(params["roberta"]["embeddings"]["word_embeddings"]["embedding"])[words]
    out = make_output_fn(apply_fn, readout, words)(params, batch)
    np.testing.assert_allclose(out, hidden @ emb.T, atol=1e-5)


def test_prompt_readout_without_label_words_is_an_error(tiny):
    with pytest.raises(ValueError, match="needs label_word_ids"):
        make_output_fn(lambda *a, **k: None, "tied")


def test_trainable_splits_and_model_fns_agree_with_the_plain_model(tiny):
    path, batch, _ = tiny
    apply_fn, params = models.split(models.from_pretrained(path, head="cls", num_labels=3))
    output_fn = make_output_fn(apply_fn, "cls")
    expected = np.asarray(output_fn(params, batch))

    head, rest = split_params(params, Method.HEAD)
    assert set(params_lib.flatten(head)) == {
        p for p in params_lib.flatten(params) if p.startswith("classifier.")
    }
    out = make_model_fn(output_fn, Method.HEAD)(head, rest, batch, None)
    np.testing.assert_allclose(out, expected, atol=1e-6)

    full, frozen = split_params(params, Method.FULL)
    out = make_model_fn(output_fn, "full")(full, frozen, batch, None)
    np.testing.assert_allclose(out, expected)

    cfg = lora.LoraConfig(r=2, alpha=4, targets="query|value")
    adapters, base = split_params(params, Method.LORA, key=jax.random.key(0), lora_config=cfg)
    lora_fn = make_model_fn(output_fn, Method.LORA, lora_config=cfg)
    # B = 0 at init: the LoRA model is the base model.
    np.testing.assert_allclose(lora_fn(adapters, base, batch, None), expected, atol=1e-6)
    grads = jax.grad(lambda a: jnp.sum(lora_fn(a, base, batch, None)))(adapters)
    assert all(float(jnp.abs(g["lora_b"]).sum()) > 0 for g in grads.values())


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_cls_head_on_cached_features_equals_the_full_model(tmp_path, tiny, model_type):
    """RoBERTa's head is dense-tanh-out_proj on <s>; BERT's reads the pooler (frozen) first."""
    from lora_jax.readout import make_cls_feature_fns

    _, batch, _ = tiny
    path = make_tiny_checkpoint(tmp_path / model_type, model_type=model_type)
    model = models.from_pretrained(path, head="cls", num_labels=3, seed=1)
    apply_fn, params = models.split(model)
    expected = np.asarray(make_output_fn(apply_fn, "cls")(params, batch))

    feature_fn, head_fn = make_cls_feature_fns(model.config)
    features = feature_fn(params, batch)
    assert features.shape == (3, model.config.hidden_size)
    states = models.forward(
        params, batch["input_ids"], batch["attention_mask"], config=model.config, head=None
    )
    np.testing.assert_allclose(features, np.asarray(states)[:, 0], atol=1e-5)
    out = head_fn(params, {"features": features, "labels": None})
    np.testing.assert_allclose(out, expected, atol=1e-5)

    # Trained as the head-only method: same outputs and the same gradients as the full model.
    head, rest = split_params(params, Method.HEAD)
    full_fn = make_model_fn(make_output_fn(apply_fn, "cls"), Method.HEAD)
    cached_fn = make_model_fn(head_fn, Method.HEAD)
    g_full = jax.grad(lambda h: jnp.sum(full_fn(h, rest, batch, None) ** 2))(head)
    g_cached = jax.grad(lambda h: jnp.sum(cached_fn(h, rest, {"features": features}, None) ** 2))(
        head
    )
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_cached), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
