"""Task readouts and NTK tools on DeBERTa-v3 and ELECTRA.

Oracles: PyTorch's ElectraForPreTraining scores for Prompting ELECTRA (golden file), the
checkpoints' heads for readout 'auto', and hand-built J J^T / exact first-order Taylor
expansions for the eNTK and the linearization.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax import lora, models
from lora_jax.readout import Readout, load_prompt_encoder, make_output_fn
from ntk import _testing

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
GOLDEN = Path(__file__).parent / "golden"


def test_prompting_electra_matches_pytorch_discriminator():
    z, p = np.load(GOLDEN / "electra_rtd.npz"), np.load(GOLDEN / "electra_prompt.npz")
    model, readout = load_prompt_encoder(GOLDEN / "electra_rtd")
    assert readout is Readout.RTD  # auto: no MLM head, a discriminator
    apply_fn, params = models.split(model)
    batch = {k: z[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["mask_pos"] = p["mask_pos"]
    out = jax.jit(make_output_fn(apply_fn, readout, p["words"]))(params, batch)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(out), p["scores"], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "ckpt,want",
    [("deberta_mlm", Readout.MLM), ("electra_mlm", Readout.MLM), ("deberta_cls", "tied_mean")],
)
def test_auto_readout_picks_the_checkpoint_head(ckpt, want):
    model, readout = load_prompt_encoder(GOLDEN / ckpt)
    assert readout == want
    assert model.head == {"mlm": "mlm", "tied_mean": None}[readout.value]


def test_explicit_readout_without_its_head_is_an_error():
    with pytest.raises(models.MissingHeadError, match="replaced-token-detection"):
        load_prompt_encoder(GOLDEN / "deberta_mlm", "rtd")


V3 = dict(  # DeBERTa-v3 options, tiny sizes
    model_type="deberta-v2",
    relative_attention=True,
    share_att_key=True,
    pos_att_type=("p2c", "c2p"),
    position_buckets=4,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=0,
    pad_token_id=0,
)
TINY = dict(
    vocab_size=48,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
)


def _batch(n, seed, t=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 48, size=(n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[::2, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask, "mask_pos": np.full(n, 2, np.int32)}


@pytest.mark.parametrize(
    "name,config,head,readout,targets",
    [
        ("deberta", V3, "mlm", "mlm", ("query_proj", "value_proj")),
        ("electra", dict(model_type="electra", embedding_size=8), "rtd", "rtd", ("query", "value")),
    ],
)
def test_lora_entk_and_linearization(name, config, head, readout, targets):
    """DeBERTa: structured-derivatives eNTK = J J^T; both: nt.linearize is f + J dw."""
    with jax.enable_x64():
        cfg = models.EncoderConfig(**(TINY | config))
        model = models.create(cfg, head=head, dtype=jnp.float64, seed=3)
        apply_fn, params = models.split(model)
        output_fn = make_output_fn(apply_fn, readout, np.array([5, 9]))
        lcfg = lora.LoraConfig(r=2, alpha=4.0, targets=targets)
        adapters = lora.init(jax.random.PRNGKey(1), params, lcfg)
        adapters = jax.tree.map(lambda a: a + 0.05, adapters)  # B != 0
        f, adapters, _ = ntk.lora_kernel_model(output_fn, params, adapters, lcfg)
        x1, x2 = _batch(2, 0), _batch(3, 1)
        if name == "deberta":  # ELECTRA's body is BERT's, whose eNTK test_ntk_encoder covers
            expected = _testing.hand_ntk(f, adapters, x1, x2)
            sd = ntk.NtkImplementation.STRUCTURED_DERIVATIVES  # the most complex implementation
            got = ntk.empirical_ntk_fn(f, trace_axes=(), implementation=sd)(x1, x2, adapters)
            assert got.shape == (2, 3, 2, 2)
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        # Linearization: f_lin(w0 + dw) = f(w0) + J dw, exact to first order.
        f_lin = jax.jit(ntk.linearize(f, adapters))
        dw = jax.tree.map(lambda a: 1e-4 * jnp.ones_like(a), adapters)
        moved = jax.tree.map(jnp.add, adapters, dw)
        f0, jvp = jax.jit(lambda w, d: jax.jvp(lambda v: f(v, x1), (w,), (d,)))(adapters, dw)
        lin = f_lin(moved, x1)
        np.testing.assert_allclose(lin, f0 + jvp, rtol=0, atol=1e-12)
        assert np.abs(jax.jit(f)(moved, x1) - lin).max() < 1e-6  # second order
