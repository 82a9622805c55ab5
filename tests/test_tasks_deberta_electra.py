"""Prompt encoding with DeBERTa-v3's SentencePiece tokenizer and ELECTRA's WordPiece.

The DeBERTa tokenizer is transformers' own ``DebertaV2Tokenizer`` (Metaspace ``▁`` word
starts) over the tiny vocabulary of ``lora_jax.testing.make_tiny_checkpoint``; no real
DeBERTa-v3 tokenizer is available offline. Oracles: the tokenizer on the whole filled-in
sentence, with the mask or with the label word in its place.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from lora_jax import tasks
from lora_jax.readout import Readout, load_prompt_encoder, make_output_fn
from lora_jax.tasks import Examples
from lora_jax.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("deberta"),
        model_type="deberta-v2",
        num_layers=1,
        hidden=16,
        heads=2,
        intermediate=32,
    )


@pytest.fixture(scope="module")
def deberta_tok(deberta_dir):
    return AutoTokenizer.from_pretrained(str(deberta_dir))


@pytest.fixture(scope="module")
def electra_tok(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("electra"), model_type="electra")
    return AutoTokenizer.from_pretrained(str(path))


TEXTS = ("a good movie about the story .", "the answer is yes")
TEMPLATES = [
    ("mr", "{0} It was {mask} ."),
    ("trec", "{mask} : {0}"),
    ("mrpc", "{0} {mask} , {1}"),
    ("boolq", "{0} Question: {1} ? Answer: {mask} ."),
]


def _encode(task, tok, word_style=None):
    texts = TEXTS[: len(task.text_fields)]
    examples = Examples(texts=tuple((t,) for t in texts), labels=np.array([0]))
    style = word_style or tasks.word_style_for(
        "deberta-v2" if "Deberta" in type(tok).__name__ else "electra"
    )
    batch = tasks.encode(examples, tok, task, max_length=48, pad_to="longest", word_style=style)
    n = int(batch["attention_mask"][0].sum())
    return batch["input_ids"][0, :n].tolist(), int(batch["mask_pos"][0]), texts, style


# The tiny WordPiece vocabulary lacks TREC's "expression" (see make_tiny_checkpoint).
GRID = [(t, n, tpl) for t in ("deberta_tok", "electra_tok") for n, tpl in TEMPLATES]
GRID = [g for g in GRID if g[:2] != ("electra_tok", "trec")]


@pytest.mark.parametrize("tok_name,name,template", GRID)
def test_template_and_label_words_match_whole_sentence_tokenization(
    tok_name, name, template, request
):
    tok = request.getfixturevalue(tok_name)
    task = tasks.get_task(name)
    ids, mask_pos, texts, style = _encode(task, tok)
    # With the mask token: the tokenizer on the whole string.
    assert ids == tok(template.format(*texts, mask=tok.mask_token))["input_ids"]
    # With each label word in the mask's place: the tokenizer on the natural sentence.
    words = tasks.label_word_ids(tok, task, style)
    for word, word_id in zip(task.label_words, words, strict=True):
        filled = list(ids)
        filled[mask_pos] = int(word_id)
        assert filled == tok(template.format(*texts, mask=word))["input_ids"], word


def test_deberta_spells_words_after_a_space_with_the_word_start_marker(deberta_tok):
    assert tasks.word_style_for("deberta-v2") == "leading_space"
    task = tasks.get_task("sst2")
    ids, mask_pos, _, _ = _encode(task, deberta_tok)
    tokens = deberta_tok.convert_ids_to_tokens(ids)
    assert tokens[mask_pos - 2 :] == ["▁It", "▁was", "[MASK]", "▁.", "[SEP]"]
    words = deberta_tok.convert_ids_to_tokens(tasks.label_word_ids(deberta_tok, task))
    assert words == ["▁terrible", "▁great"]
    # SentencePiece marks every word start, so the style does not change the encoding.
    assert _encode(task, deberta_tok, "plain")[0] == ids


def test_prompt_readout_runs_on_a_tiny_deberta(deberta_dir, deberta_tok):
    model, readout = load_prompt_encoder(deberta_dir)
    assert readout is Readout.MLM
    task = tasks.get_task("sst2")
    examples = Examples(texts=(("a good movie", "a bad film"),), labels=np.array([1, 0]))
    batch = tasks.encode(examples, deberta_tok, task, max_length=16)
    from lora_jax import models

    apply_fn, params = models.split(model)
    ids = tasks.label_word_ids(deberta_tok, task, "leading_space")
    out = np.asarray(make_output_fn(apply_fn, readout, ids)(params, batch))
    full = np.asarray(apply_fn(params, batch["input_ids"], batch["attention_mask"]))
    np.testing.assert_allclose(out, full[np.arange(2), batch["mask_pos"]][:, ids], atol=1e-5)
