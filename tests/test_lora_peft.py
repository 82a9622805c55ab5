"""PEFT interop against golden files written by PEFT itself (tests/golden/make_peft_golden.py).

peft_mlm / peft_cls: adapters trained-ish (perturbed) and saved by PEFT; we load them, run our
model and compare logits with PEFT's, compare our merged kernels with PEFT's merge_and_unload, and
re-export with save_peft and compare tensors and key names with PEFT's file.
peft_ours: an adapter exported by save_peft, loaded by PEFT; PEFT's logits vs ours.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax import lora
from lora_jax.models import from_pretrained, load_peft_model, split

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TOL = 1e-4  # float32 max abs logit difference


@functools.cache
def _case(name, head):
    d = os.path.join(GOLDEN, name)
    apply_fn, params = split(from_pretrained(os.path.join(d, "base"), head=head))
    io = np.load(os.path.join(d, "io.npz"))
    return jax.jit(apply_fn), params, io, d


@pytest.fixture(
    scope="module", params=[("peft_mlm", "mlm"), ("peft_cls", "cls")], ids=["mlm", "cls"]
)
def case(request):
    return _case(*request.param)


def _run(fwd, params, io):
    return np.asarray(
        fwd(
            params,
            jnp.asarray(io["input_ids"], jnp.int32),
            jnp.asarray(io["attention_mask"], jnp.int32),
        )
    )


@pytest.mark.parametrize("fusion", ["merged", "fused"])
def test_peft_adapter_outputs_match_peft(case, fusion):
    fwd, params, io, d = case
    np.testing.assert_allclose(_run(fwd, params, io), io["base_logits"], atol=TOL)
    adapters, cfg = lora.load_peft(os.path.join(d, "adapter"))
    out = _run(fwd, lora.apply(params, adapters, cfg, fusion=fusion), io)
    assert np.abs(io["peft_logits"] - io["base_logits"]).max() > 0.1  # the adapter matters
    assert np.abs(out - io["peft_logits"]).max() <= TOL


def test_merged_kernels_match_peft_merge_and_unload(case):
    _, params, io, d = case
    adapters, cfg = lora.load_peft(os.path.join(d, "adapter"))
    merged = lora.merge(params, adapters, cfg)
    flat = dict(zip(lora.core.tree_paths(merged), jax.tree.leaves(merged), strict=True))
    checked = 0
    for key in io.files:
        if not key.startswith("merged/"):
            continue
        path = key.removeprefix("merged/").removesuffix(".weight") + ".kernel"
        if path not in flat:  # tied decoder weight lives in the embedding
            continue
        np.testing.assert_allclose(flat[path], io[key], atol=1e-5, err_msg=path)
        checked += 1
    assert checked >= 13  # 2 layers x 6 Linears + a head Linear


def test_config_and_patterns_from_peft():
    _, params, _, d = _case("peft_cls", "cls")
    adapters, cfg = lora.load_peft(os.path.join(d, "adapter"))
    assert cfg.use_rslora and cfg.bias is lora.LoraBias.LORA_ONLY
    assert cfg.modules_to_save == ("classifier", "score")
    plan = lora.resolve(params, cfg).lora
    q1 = plan["roberta.encoder.layer.1.attention.self.query"]
    v0 = plan["roberta.encoder.layer.0.attention.self.value"]
    assert (q1.r, q1.alpha) == (4, 32.0) and q1.scale == pytest.approx(32 / 2)
    assert (v0.r, v0.alpha) == (2, 8.0) and v0.scale == pytest.approx(8 / np.sqrt(2))
    assert sorted(adapters["classifier.out_proj"]) == ["bias", "kernel"]


def test_save_peft_reproduces_peft_tensors_and_key_names(case, tmp_path):
    _, _, _, d = case
    adapters, cfg = lora.load_peft(os.path.join(d, "adapter"))
    lora.save_peft(tmp_path, adapters, cfg)
    theirs = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
    ours = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    with open(os.path.join(d, "adapter", "adapter_config.json")) as f:
        pc = json.load(f)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        oc = json.load(f)
    for field in (
        "peft_type",
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "bias",
    ):
        assert oc[field] == pc[field], field
    # Ours lists the adapted modules explicitly; they are exactly the modules PEFT adapted.
    adapted = sorted(
        {
            k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            for k in theirs
            if ".lora_" in k
        }
    )
    assert oc["target_modules"] == adapted


def _golden_script():
    spec = importlib.util.spec_from_file_location(
        "make_peft_golden", os.path.join(GOLDEN, "make_peft_golden.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_export_loads_in_peft_with_same_outputs(tmp_path):
    """Reverse direction: tests/golden/peft_ours was written by save_peft and run by PEFT."""
    script = _golden_script()
    OURS_CONFIG, SEED = script.OURS_CONFIG, script.SEED

    fwd, params, _, _ = _case("peft_cls", "cls")
    d = os.path.join(GOLDEN, "peft_ours")
    io = np.load(os.path.join(d, "io.npz"))
    # Rebuild the exported adapter exactly as stage "ours" of the golden script does.
    cfg = lora.LoraConfig(**OURS_CONFIG)
    k_init, k_b = jax.random.split(jax.random.key(SEED))
    leaves, tdef = jax.tree.flatten(lora.init(k_init, params, cfg))
    keys = jax.random.split(k_b, len(leaves))
    adapters = jax.tree.unflatten(
        tdef,
        [
            x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    out = _run(fwd, lora.apply(params, adapters, cfg), io)
    assert np.abs(out - io["peft_logits"]).max() <= TOL
    # Our exported files are reproducible bit for bit.
    committed = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
    fresh_dir = tmp_path
    lora.save_peft(
        fresh_dir,
        adapters,
        cfg,
        task_type="SEQ_CLS",
        base_model_name_or_path="tests/golden/peft_cls/base",
    )
    fresh = load_file(os.path.join(fresh_dir, "adapter_model.safetensors"))
    assert sorted(fresh) == sorted(committed)
    for k in committed:
        np.testing.assert_allclose(fresh[k], committed[k], atol=1e-7, err_msg=k)
    # And the committed directory round-trips through load_peft onto the same outputs.
    back, cfg_back = lora.load_peft(os.path.join(d, "adapter"))
    assert (
        np.abs(_run(fwd, lora.apply(params, back, cfg_back), io) - io["peft_logits"]).max() <= TOL
    )


def test_load_peft_model_convenience():
    d = os.path.join(GOLDEN, "peft_mlm")
    io = np.load(os.path.join(d, "io.npz"))
    apply_fn, params = load_peft_model(
        os.path.join(d, "base"), os.path.join(d, "adapter"), head="mlm"
    )
    assert np.abs(_run(jax.jit(apply_fn), params, io) - io["peft_logits"]).max() <= TOL


def test_from_pretrained_with_peft_adapter_matches_peft():
    d = os.path.join(GOLDEN, "peft_mlm")
    io = np.load(os.path.join(d, "io.npz"))
    model = from_pretrained(os.path.join(d, "base"), head="mlm", adapter=os.path.join(d, "adapter"))
    out = model(
        jnp.asarray(io["input_ids"], jnp.int32), jnp.asarray(io["attention_mask"], jnp.int32)
    )
    assert np.abs(np.asarray(out) - io["peft_logits"]).max() <= TOL


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("use_dora", True, "use_dora"),
        ("fan_in_fan_out", True, "fan_in_fan_out"),
        ("megatron_config", {"x": 1}, "megatron_config"),
        ("target_parameters", ["mlp.experts.weight"], "target_parameters"),
        ("lora_bias", True, "lora_bias"),
        ("layer_replication", [[0, 2]], "layer_replication"),
        ("init_lora_weights", "pissa", "pissa"),
        ("init_lora_weights", "olora", "olora"),
        ("target_modules", "all-linear", "all-linear"),
        ("peft_type", "IA3", "peft_type"),
    ],
)
def test_unsupported_peft_features_are_named(tmp_path, field, value, needle):
    with open(os.path.join(GOLDEN, "peft_mlm", "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    config[field] = value
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=needle):
        lora.load_peft(tmp_path)


def test_peft_round_trip_of_our_config_fields():
    cfg = lora.LoraConfig(
        r=4,
        alpha=6.5,
        targets="query",
        rank_pattern={"value": 2},
        use_rslora=True,
        bias="all",
        init="gaussian",
    )
    d = lora.to_peft_config(cfg, ["a.query", "b.query"], task_type="SEQ_CLS")
    assert d["target_modules"] == ["a.query", "b.query"] and d["lora_alpha"] == 6.5
    assert d["init_lora_weights"] == "gaussian" and d["lora_dropout"] == 0.0
    back = lora.from_peft_config(d)
    assert (back.r, back.alpha, back.rank_pattern, back.use_rslora, back.bias, back.init) == (
        4,
        6.5,
        (("value", 2),),
        True,
        lora.LoraBias.ALL,
        lora.LoraInit.GAUSSIAN,
    )
