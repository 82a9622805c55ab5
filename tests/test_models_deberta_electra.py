"""DeBERTa-v2/v3 and ELECTRA parity with Hugging Face PyTorch through golden files.

The oracle is transformers itself: tests/golden/make_golden_deberta_electra.py (run with a torch
venv) saved tiny random checkpoints for every head, padded input batches and the PyTorch outputs
in float32 and float64, transformers' relative-position buckets of DeBERTa-v3-base, and the
check that transformers loads our saved directories (roundtrip_v3.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_jax import models
from lora_jax.models import deberta

GOLDEN = Path(__file__).parent / "golden"
CASES = {  # checkpoint dir -> head
    "deberta_mlm": "mlm",
    "deberta_lmp": "mlm",
    "deberta_cls": "cls",
    "deberta_base": None,
    "electra_mlm": "mlm",
    "electra_rtd": "rtd",
    "electra_cls": "cls",
}
TOL = {"float32": 1e-4, "bfloat16": 0.1, "float64": 1e-10}
# float64 on every DeBERTa variant and one ELECTRA (the same BERT body as test_models_golden).
GRID = [(c, "float32") for c in CASES]
GRID += [(c, "float64") for c in CASES if c.startswith("deberta") or c == "electra_mlm"]
GRID += [("deberta_mlm", "bfloat16")]


def _golden(name: str):
    z = np.load(GOLDEN / f"{name}.npz")
    return (z["input_ids"], z["attention_mask"], z["token_type_ids"]), z


@pytest.mark.parametrize("ckpt,dtype", GRID, ids=[f"{c}-{d}" for c, d in GRID])
def test_matches_pytorch(ckpt, dtype):
    inputs, z = _golden(ckpt)
    assert (inputs[1] == 0).any(), "golden batch must contain padding"
    with jax.enable_x64(dtype == "float64"):
        model = models.from_pretrained(GOLDEN / ckpt, head=CASES[ckpt], dtype=dtype)
        out = model(*inputs)
        assert out.dtype == jnp.dtype(dtype)
        out = np.asarray(out.astype(jnp.float64 if dtype == "float64" else jnp.float32))
    want = z["out64"] if dtype == "float64" else z["out"]
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=TOL[dtype])


def test_torch_bin_loads_like_safetensors():
    inputs, z = _golden("deberta_mlm")
    out = np.asarray(models.from_pretrained(GOLDEN / "deberta_bin", head="mlm")(*inputs))
    np.testing.assert_allclose(out, z["out"], rtol=0, atol=1e-4)


def test_relative_position_buckets_match_transformers_v3_base():
    """DeBERTa-v3-base bucketing (256 buckets, max 512) on 1024 tokens, HF's float32 math."""
    z = np.load(GOLDEN / "deberta_buckets.npz")
    rel = deberta.relative_positions(1024, 256, 512)
    np.testing.assert_array_equal(rel[:, 0], z["first_col"])
    np.testing.assert_array_equal(rel[0, :], z["first_row"])
    assert np.abs(rel[:512, :512]).max() < 256  # up to 512 tokens: inside the 2 S = 512 rows


@pytest.mark.parametrize("ckpt", ["deberta_mlm", "deberta_lmp", "electra_mlm"])
def test_mask_positions_and_label_words_match_full_logits(ckpt):
    inputs, z = _golden(ckpt)
    model = models.from_pretrained(GOLDEN / ckpt, head="mlm")
    pos = np.array([5, 2, 3], np.int32)
    words = np.array([7, 40, 99], np.int32)
    want = z["out"][np.arange(3), pos]
    picked = np.asarray(model(*inputs, mask_positions=pos, label_word_ids=words))
    np.testing.assert_allclose(picked, want[:, words], atol=1e-4)


@pytest.mark.parametrize("ckpt", ["deberta_base", "electra_rtd"])
def test_one_position_outputs(ckpt):
    inputs, z = _golden(ckpt)
    model = models.from_pretrained(GOLDEN / ckpt, head=CASES[ckpt])
    pos = np.array([0, 6, 3], np.int32)
    out = np.asarray(model(*inputs, mask_positions=pos))
    np.testing.assert_allclose(out, z["out"][np.arange(3), pos], atol=1e-4)


@pytest.mark.parametrize("ckpt", list(CASES))
def test_save_pretrained_writes_what_transformers_writes(ckpt, tmp_path):
    """Same keys, shapes and values as transformers' own save_pretrained of the same model."""
    head = CASES[ckpt]
    model = models.from_pretrained(GOLDEN / ckpt, head=head)
    models.save_pretrained(model, tmp_path)
    theirs = load_file(GOLDEN / ckpt / "model.safetensors")
    ours = load_file(tmp_path / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    cfg = json.loads((tmp_path / "config.json").read_text())
    hf = json.loads((GOLDEN / ckpt / "config.json").read_text())
    assert cfg["architectures"] == hf["architectures"]
    keys = ["model_type", "hidden_size", "vocab_size", "pad_token_id", "layer_norm_eps"]
    if ckpt.startswith("deberta"):
        keys += ["relative_attention", "position_buckets", "max_relative_positions"]
        keys += ["share_att_key", "position_biased_input", "pos_att_type", "norm_rel_ebd"]
        keys += ["type_vocab_size", "legacy"]
    else:
        keys += ["embedding_size"]
    for key in keys:
        if key in hf:  # transformers leaves out some options it was not given
            assert cfg[key] == hf[key], key
    inputs, _ = _golden(ckpt)
    reloaded = models.from_pretrained(tmp_path, head=head)
    np.testing.assert_array_equal(np.asarray(reloaded(*inputs)), np.asarray(model(*inputs)))


def test_transformers_read_our_directories():
    """Recorded by the golden script: transformers loaded our save_pretrained output cleanly."""
    report = json.loads((GOLDEN / "roundtrip_v3.json").read_text())
    assert set(report) == set(CASES)
    for name, entry in report.items():
        assert entry["loading_problems"] == {}, name
        assert entry["max_abs_diff_transformers_vs_lora_jax"] < 1e-4, name


def test_legacy_flag_follows_the_checkpoint(tmp_path):
    """Microsoft's DeBERTa weights keep the MLM head in lm_predictions.* with no `legacy` key."""
    d = tmp_path / "lmp"
    shutil.copytree(GOLDEN / "deberta_lmp", d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["legacy"]  # transformers' default, True, would initialize cls.predictions afresh
    (d / "config.json").write_text(json.dumps(cfg))
    model = models.from_pretrained(d, head="mlm")
    assert model.config.legacy is False
    inputs, z = _golden("deberta_lmp")
    np.testing.assert_allclose(np.asarray(model(*inputs)), z["out"], atol=1e-4)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(models.CheckpointError, match="no masked-LM head"):
        models.from_pretrained(GOLDEN / "deberta_cls", head="mlm")
    with pytest.raises(models.CheckpointError, match="replaced-token-detection"):
        models.from_pretrained(GOLDEN / "electra_mlm", head="rtd")
    with pytest.raises(ValueError, match="ELECTRA's discriminator"):
        models.create(models.EncoderConfig.from_hf(_config("deberta_base")), head="rtd")
    # A weight missing from the file.
    d = tmp_path / "missing"
    shutil.copytree(GOLDEN / "deberta_mlm", d)
    state = load_file(d / "model.safetensors")
    del state["deberta.encoder.rel_embeddings.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(models.CheckpointError, match="rel_embeddings"):
        models.from_pretrained(d, head="mlm")
    # A config option that is not implemented.
    cfg = _config("deberta_base") | {"conv_kernel_size": 3}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError, match="conv_kernel_size"):
        models.from_pretrained(d, head=None)
    with pytest.raises(ValueError, match="pos_att_type"):
        models.EncoderConfig(model_type="deberta-v2", pos_att_type=("c2c",))


def _config(name: str) -> dict:
    return json.loads((GOLDEN / name / "config.json").read_text())


@pytest.mark.parametrize("ckpt", ["deberta_lmp", "deberta_cls", "electra_mlm", "electra_rtd"])
def test_every_parameter_has_logical_axes(ckpt):
    model = models.from_pretrained(GOLDEN / ckpt, head=CASES[ckpt])
    _, params = models.split(model)
    axes = models.logical_axes(params)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_p) == len(flat_a)
    for (path, value), names in zip(flat_p, flat_a, strict=True):
        assert len(names) == value.ndim, path
    layer = params[model.config.base_prefix]["encoder"]["layer"][0]["attention"]["self"]
    layer_axes = axes[model.config.base_prefix]["encoder"]["layer"][0]["attention"]["self"]
    for name, p in layer.items():
        assert layer_axes[name]["kernel"] == ("embed", "heads"), name
        assert p["kernel"].shape[0] == model.config.hidden_size
