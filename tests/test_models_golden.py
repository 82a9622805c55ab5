"""Parity of lora_jax.models with Hugging Face PyTorch through golden files.

The oracle is transformers itself: tests/golden/make_golden.py (run with a torch venv) saved
tiny random RoBERTa / BERT checkpoints, padded input batches and the PyTorch outputs in float32
and float64, plus the pretrained MiniLM-L6 on real sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax import models

GOLDEN = Path(__file__).parent / "golden"
CASES = [  # (checkpoint dir, golden npz, head)
    ("roberta_mlm", "roberta_mlm", "mlm"),
    ("roberta_cls", "roberta_cls", "cls"),
    ("bert_mlm", "bert_mlm", "mlm"),
    ("bert_cls", "bert_cls", "cls"),
    ("bert_base", "bert_base", None),
    ("bert_bin", "bert_base", None),  # same weights as a torch pytorch_model.bin
]
# Max abs difference allowed per compute dtype (float64 is compared with torch float64).
TOL = {"float32": 1e-4, "bfloat16": 0.1, "float64": 1e-10}


def _golden(npz: str):
    z = np.load(GOLDEN / f"{npz}.npz")
    return (z["input_ids"], z["attention_mask"], z["token_type_ids"]), z


# bert_bin only differs in the file format; cls heads get bfloat16 coverage from the bodies.
GRID = [
    (*case, dtype)
    for case in CASES
    for dtype in ("float32", "bfloat16", "float64")
    if case[0] != "bert_bin" or dtype == "float32"
    if not (case[2] == "cls" and dtype == "bfloat16")
]


@pytest.mark.parametrize("ckpt,npz,head,dtype", GRID, ids=[f"{g[0]}-{g[3]}" for g in GRID])
def test_matches_pytorch(ckpt, npz, head, dtype):
    inputs, z = _golden(npz)
    assert (inputs[1] == 0).any(), "golden batch must contain padding"
    with jax.enable_x64(dtype == "float64"):
        model = models.from_pretrained(GOLDEN / ckpt, head=head, dtype=dtype)
        out = model(*inputs)
        assert out.dtype == jnp.dtype(dtype)
        out = np.asarray(out.astype(jnp.float64 if dtype == "float64" else jnp.float32))
    want = z["out64"] if dtype == "float64" else z["out"]
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=TOL[dtype])


def test_minilm_matches_pytorch():
    inputs, z = _golden("minilm")
    model = models.from_pretrained(models.minilm_path(), head=None)
    out = np.asarray(model(*inputs))
    assert out.shape == z["out"].shape == (4, inputs[0].shape[1], 384)
    np.testing.assert_allclose(out, z["out"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("ckpt", ["roberta_mlm", "bert_mlm"])
def test_mask_positions_and_label_words_match_full_logits(ckpt):
    inputs, z = _golden(ckpt)
    model = models.from_pretrained(GOLDEN / ckpt, head="mlm")
    pos = np.array([5, 2, 3], np.int32)
    words = np.array([7, 40, 99], np.int32)
    if ckpt == "roberta_mlm":
        at_mask = np.asarray(model(*inputs, mask_positions=pos))
        np.testing.assert_allclose(at_mask, z["out"][np.arange(3), pos], atol=1e-4)
    picked = np.asarray(model(*inputs, mask_positions=pos, label_word_ids=words))
    np.testing.assert_allclose(picked, z["out"][np.arange(3), pos][:, words], atol=1e-4)


def test_hidden_states_at_mask_positions():
    inputs, z = _golden("bert_base")
    model = models.from_pretrained(GOLDEN / "bert_base", head=None)
    pos = np.array([0, 6, 3], np.int32)
    out = np.asarray(model(*inputs, mask_positions=pos))
    np.testing.assert_allclose(out, z["out"][np.arange(3), pos], atol=1e-4)


def test_jit_split_equals_module_call():
    ckpt = "roberta_mlm"
    inputs, z = _golden(ckpt)
    model = models.from_pretrained(GOLDEN / ckpt, head="mlm")
    apply_fn, params = models.split(model)
    assert isinstance(params, dict) and 0 in params[model.config.model_type]["encoder"]["layer"]
    jitted = np.asarray(jax.jit(apply_fn)(params, *inputs))
    np.testing.assert_allclose(jitted, np.asarray(model(*inputs)), atol=1e-6)
    np.testing.assert_allclose(jitted, z["out"], atol=1e-4)


@pytest.mark.parametrize("ckpt,head", [(c[0], c[2]) for c in CASES[:5]])
def test_save_pretrained_writes_what_transformers_writes(ckpt, head, tmp_path):
    """Same keys, shapes and values as transformers' own save_pretrained of the same model."""
    model = models.from_pretrained(GOLDEN / ckpt, head=head)
    models.save_pretrained(model, tmp_path)
    theirs, ours = (
        load_file(GOLDEN / ckpt / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    cfg = json.loads((tmp_path / "config.json").read_text())
    hf = json.loads((GOLDEN / ckpt / "config.json").read_text())
    assert cfg["architectures"] == hf["architectures"]
    for key in ("model_type", "hidden_size", "vocab_size", "pad_token_id", "layer_norm_eps"):
        assert cfg[key] == hf[key], key
    if head == "cls":  # transformers omits id2label for its default of 2 labels
        assert len(cfg["id2label"]) == len(hf.get("id2label", "01")) == model.num_labels
    reloaded = models.from_pretrained(tmp_path, head=head)
    inputs, z = _golden(ckpt)
    np.testing.assert_array_equal(np.asarray(reloaded(*inputs)), np.asarray(model(*inputs)))


def test_transformers_read_our_directories():
    """Recorded by make_golden.py: transformers loaded our save_pretrained output cleanly."""
    report = json.loads((GOLDEN / "roundtrip.json").read_text())
    assert set(report) >= {"roberta_mlm", "roberta_cls", "bert_mlm", "bert_cls", "minilm"}
    for name, entry in report.items():
        assert entry["loading_problems"] == {}, name
        assert entry["max_abs_diff_transformers_vs_lora_jax"] < 1e-4, name


def test_old_style_keys_load(tmp_path):
    """gamma/beta LayerNorm names, position_ids buffers, an NSP head and untied-decoder copies."""
    from safetensors.numpy import save_file

    state = load_file(GOLDEN / "bert_mlm" / "model.safetensors")
    old = {}
    for key, value in state.items():
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        old[key] = value
    old["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    old["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
    old["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text((GOLDEN / "bert_mlm" / "config.json").read_text())
    save_file(old, str(d / "model.safetensors"))
    inputs, z = _golden("bert_mlm")
    out = np.asarray(models.from_pretrained(d, head="mlm")(*inputs))
    np.testing.assert_allclose(out, z["out"], rtol=0, atol=1e-4)
