"""PEFT LoRA interop on DeBERTa-v3 and ELECTRA (tests/golden/make_peft_golden_deberta_electra.py).

PEFT -> us: adapters saved by PEFT (query_proj|value_proj on a DeBERTa-v3-like classifier,
query|value on an ELECTRA generator) give PEFT's logits here, merged and fused, and re-export
to PEFT's exact tensors. Us -> PEFT: adapters written by lora.save_peft, loaded by PEFT, gave
the logits recorded in io.npz.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax import lora
from lora_jax.models import from_pretrained, split

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TOL = 1e-4  # float32 max abs logit difference
CASES = {"peft_deberta": "cls", "peft_electra": "mlm"}


@functools.cache
def _case(name):
    d = os.path.join(GOLDEN, name)
    apply_fn, params = split(from_pretrained(os.path.join(d, "base"), head=CASES[name]))
    return jax.jit(apply_fn), params, np.load(os.path.join(d, "io.npz")), d


def _run(fwd, params, io):
    ids, mask = (jnp.asarray(io[k], jnp.int32) for k in ("input_ids", "attention_mask"))
    return np.asarray(fwd(params, ids, mask))


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_gives_peft_logits(name, tmp_path):
    fwd, params, io, d = _case(name)
    np.testing.assert_allclose(_run(fwd, params, io), io["base_logits"], atol=TOL)
    adapters, cfg = lora.load_peft(os.path.join(d, "adapter"))
    assert np.abs(io["peft_logits"] - io["base_logits"]).max() > 0.01  # the adapter matters
    for fusion in ("merged", "fused"):
        out = _run(fwd, lora.apply(params, adapters, cfg, fusion=fusion), io)
        assert np.abs(out - io["peft_logits"]).max() <= TOL, fusion
    # Re-export: PEFT's tensors and key names exactly.
    theirs = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
    lora.save_peft(tmp_path, adapters, cfg)
    ours = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


@pytest.mark.parametrize("name", list(CASES))
def test_our_export_loads_in_peft_with_same_logits(name):
    spec = importlib.util.spec_from_file_location(
        "make_peft_golden_deberta_electra",
        os.path.join(GOLDEN, "make_peft_golden_deberta_electra.py"),
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fwd, params, io, d = _case(name)
    adapters, cfg = script.our_adapters(name, params)
    targets = {p.rsplit(".", 1)[-1] for p, leaves in adapters.items() if "lora_a" in leaves}
    assert targets == (
        {"query_proj", "value_proj"} if name == "peft_deberta" else {"query", "value"}
    )
    out = _run(fwd, lora.apply(params, adapters, cfg), io)
    assert np.abs(out - io["base_logits"]).max() > 0.01
    assert np.abs(out - io["ours_logits"]).max() <= TOL
    # The committed export round-trips through load_peft onto the same logits.
    back, cfg_back = lora.load_peft(os.path.join(d, "ours"))
    assert (
        np.abs(_run(fwd, lora.apply(params, back, cfg_back), io) - io["ours_logits"]).max() <= TOL
    )
