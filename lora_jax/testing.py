"""Tiny offline checkpoints for tests and examples: a trained toy tokenizer + random weights.

:func:`make_tiny_checkpoint` writes a complete Hugging Face model directory (tokenizer files,
``config.json``, ``model.safetensors``) in well under a second, so tests never need the hub.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from lora_jax.errors import ConfigError

# A small English corpus: sentiment words, yes / no / maybe, question words, so that the label
# words of the built-in task templates are single tokens (" great" for RoBERTa, "great" for BERT).
_CORPUS = [
    "this movie was great , it was great .",
    "this film was terrible , it was terrible .",
    "it was good . it was bad . it was okay .",
    "the movie is good and the film is bad .",
    "a great film , a terrible movie , an okay story .",
    "is this a question ? yes . no . maybe .",
    "yes , it is . no , it is not . maybe it is .",
    "what is the answer to the question ? the answer is yes .",
    "who made this film ? where is the movie ? when was it made ?",
    "how many people saw it ? why was it so bad ? which one was good ?",
    "the acting was great but the story was terrible .",
    "i liked it . i hated it . it was fine . it was boring .",
    "the plot is good , the music is great , the ending is bad .",
    "so the answer is no , not yes , and maybe not .",
    "question : is the movie good ? answer : yes , the movie is great .",
    "overall it was an okay film with a good cast .",
    "the story was a mess and the film was terrible .",
    "really great , really good , really bad , really terrible .",
    "it is what it is . this is it . that was that .",
    "description entity abbreviation human location number .",
]
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus() -> list[str]:
    return [line for line in _CORPUS for _ in range(8)]


def _save_tokenizer(tokenizer_object, directory: Path, tokenizer_class: str, **specials) -> int:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, model_max_length=512, **specials
    )
    fast.save_pretrained(str(directory))
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = tokenizer_class
    path.write_text(json.dumps(config, indent=2))
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    size = tokenizer_object.get_vocab_size()
    if len(reloaded) != size or reloaded.mask_token != specials["mask_token"]:
        raise RuntimeError(
            f"tiny tokenizer did not round-trip: vocab {len(reloaded)} vs {size}, mask token "
            f"{reloaded.mask_token!r} vs {specials['mask_token']!r}"
        )
    return size


def _roberta_tokenizer(directory: Path) -> int:
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    specials = [*_ROBERTA_SPECIALS[:-1], AddedToken("<mask>", lstrip=True, special=True)]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        _corpus(), vocab_size=512, min_frequency=2, special_tokens=specials, show_progress=False
    )
    tok.post_processor = RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    return _save_tokenizer(
        tok._tokenizer,
        directory,
        "RobertaTokenizer",
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def _deberta_tokenizer(directory: Path) -> int:
    """DeBERTa-v3's tokenizer (``DebertaV2Tokenizer``: SentencePiece Unigram, ``▁`` marks a
    word start, ``[CLS] [SEP] [PAD] [MASK] [UNK]``) over a vocabulary built, not trained: the
    specials, every character alone and after ``▁``, and ``▁word`` for each corpus word in
    lower and capitalized case, scored so that whole words win. transformers' own class builds
    the normalizer, Metaspace pre-tokenizer and post-processor."""
    from transformers import AutoTokenizer, DebertaV2Tokenizer

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    words = sorted({w for line in _CORPUS for w in line.split()} | {"expression"})  # TREC
    words = sorted({*words, *(w.capitalize() for w in words)})
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [(t, 0.0) for t in specials] + [("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words if len(w) > 1]
    vocab += [(c, -3.0) for c in chars] + [(f"▁{c}", -2.5) for c in chars]
    fast = DebertaV2Tokenizer(vocab=vocab, model_max_length=512)
    fast.save_pretrained(str(directory))
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    if len(reloaded) != len(vocab) or reloaded.mask_token != "[MASK]":
        raise RuntimeError(f"tiny DeBERTa tokenizer did not round-trip: {len(reloaded)} tokens")
    return len(vocab)


def _bert_tokenizer(directory: Path, tokenizer_class: str = "BertTokenizer") -> int:
    """Lower-cased WordPiece whose vocabulary is built, not trained, so it is identical on every
    call: the specials, single characters and every corpus word. There are no ``##``
    continuation pieces, so a word outside the corpus (e.g. "expression") is ``[UNK]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import BertProcessing

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted(
        {w for line in _CORPUS for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line))}
    )
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = [*_BERT_SPECIALS, *chars, *(w for w in words if w not in chars)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    tok.add_special_tokens(_BERT_SPECIALS)
    tok.post_processor = BertProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    )
    return _save_tokenizer(
        tok,
        directory,
        tokenizer_class,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def make_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    model_type: str = "roberta",
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    with_mlm_head: bool = True,
) -> Path:
    """Writes a tiny random RoBERTa / BERT / ELECTRA / DeBERTa-v3 as a Hugging Face directory.

    The tokenizer comes from a built-in English corpus (byte-level BPE trained on it, with
    ``<s> <pad> </s> <unk> <mask>``, for RoBERTa; a lower-cased WordPiece over its words and
    characters, with ``[PAD] [UNK] [CLS] [SEP] [MASK]``, for BERT and ELECTRA; DeBERTa-v3's
    SentencePiece ``DebertaV2Tokenizer`` over a Unigram vocabulary trained on it; a few hundred
    tokens, identical on every call) and saved so that ``transformers.AutoTokenizer.
    from_pretrained(directory)`` loads it. Label words such as " great" / " terrible"
    (RoBERTa), "great" / "terrible" (BERT, ELECTRA) and "▁great" (DeBERTa) are single tokens.
    ELECTRA gets ``embedding_size = hidden / 2`` (so ``embeddings_project``) and its generator
    head; DeBERTa the v3 options (shared attention keys, p2c|c2p, 256 position buckets).
    Weights are random (HF init) and written as ``lora_jax.models.save_pretrained`` writes them.

    Args:
      directory: output directory (created).
      model_type: ``'roberta'``, ``'bert'``, ``'electra'`` or ``'deberta-v2'``.
      seed: weight-init seed.
      num_layers, hidden, heads, intermediate: encoder shape.
      with_mlm_head: write a ``*ForMaskedLM`` (True) or a bare ``*Model`` (False; BERT then
        has a pooler, like MiniLM).

    Returns:
      The directory, as a ``Path``.
    """
    from lora_jax.models import EncoderConfig, create, save_pretrained

    if model_type not in ("roberta", "bert", "electra", "deberta-v2"):
        raise ConfigError(
            f"model_type={model_type!r}; expected 'roberta', 'bert', 'electra' or 'deberta-v2'."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model_type == "roberta":
        vocab = _roberta_tokenizer(directory)
        special = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
        shape = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    elif model_type == "deberta-v2":
        vocab = _deberta_tokenizer(directory)
        special = dict(pad_token_id=0)
        shape = dict(max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7)
        shape |= dict(relative_attention=True, share_att_key=True, pos_att_type=("p2c", "c2p"))
        shape |= dict(position_buckets=256, norm_rel_ebd="layer_norm", position_biased_input=False)
    else:
        tokenizer_class = "ElectraTokenizer" if model_type == "electra" else "BertTokenizer"
        vocab = _bert_tokenizer(directory, tokenizer_class)
        special = dict(pad_token_id=0)
        shape = dict(max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)
        if model_type == "electra":
            shape["embedding_size"] = hidden // 2
    config = EncoderConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        **special,
        **shape,
    )
    model = create(config, head="mlm" if with_mlm_head else None, seed=seed)
    save_pretrained(model, directory)
    return directory
