"""Tokenization of few-shot examples into fixed-shape numpy batches.

A batch is a dict of int32 arrays (the contract every model, trainer and NTK tool uses):

- ``input_ids`` (N, T), ``attention_mask`` (N, T), ``token_type_ids`` (N, T),
- ``mask_pos`` (N,): position of the mask token (prompt mode) or 0 (cls mode),
- ``labels`` (N,).

Prompt mode builds ``cls + template(sentences) + sep`` with the tokenizer's own special tokens
as one segment (token types all 0). When an example is too long, the sentences are truncated
longest-first and the template never is, so every row keeps exactly one mask token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.packing import TOKEN_KEYS
from lora_jax.tasks.task import (
    Examples,
    Task,
    TemplatePart,
    WordStyle,
    apply_modifier,
    check_word_style,
    word_style_for_tokenizer,
)

MODES = ("prompt", "cls")
PAD_TO = ("max_length", "longest")
PAD_MULTIPLE = 8


def _special_id(tokenizer: Any, name: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id", None)
    if token_id is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no {name} token ({name}_token_id is None); "
            "prompt-based encoding needs cls, sep, mask and pad tokens (an encoder tokenizer "
            "such as RoBERTa's or BERT's)"
        )
    return int(token_id)


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)  # long texts: no warning
    return [list(x) for x in enc["input_ids"]]


def truncated_lengths(lengths: list[int], budget: int) -> list[int]:
    """Lengths of one or two sequences after longest-first truncation to ``budget`` tokens.

    Matches the Hugging Face (Rust) tokenizers' ``truncation='longest_first'`` for a pair: the
    shorter sequence (the first on ties) keeps ``min(its length, budget // 2)`` tokens and the
    longer one the rest of the budget.
    """
    if len(lengths) not in (1, 2):
        raise ConfigError(f"expected the lengths of 1 or 2 sequences, got {lengths}")
    if sum(lengths) <= budget:
        return list(lengths)
    if len(lengths) == 1:
        return [budget]
    first, second = lengths
    if first <= second:
        first = min(first, budget // 2)
        return [first, min(second, budget - first)]
    second = min(second, budget // 2)
    return [min(first, budget - second), second]


def _prompt_rows(
    examples: Examples, tokenizer: Any, task: Task, max_length: int, word_style: WordStyle
):
    cls_id, sep_id = _special_id(tokenizer, "cls"), _special_id(tokenizer, "sep")
    mask_id = _special_id(tokenizer, "mask")
    parts = list(task.template_parts)
    m = next(i for i, p in enumerate(parts) if p.kind == "mask")
    if word_style == "plain" and parts[m].leading_space:  # the space stays in the template
        parts.insert(m, TemplatePart("text", text=" "))
    literal = {i: _ids(tokenizer, [p.text])[0] for i, p in enumerate(parts) if p.kind == "text"}
    fixed = 2 + 1 + sum(len(v) for v in literal.values())  # cls + sep + mask + template text
    budget = max_length - fixed
    n_fields = len(task.text_fields)
    if budget < n_fields:
        raise ConfigError(
            f"max_length={max_length} leaves {budget} tokens for the text of task {task.name!r}: "
            f"the template {task.template!r} with special tokens already takes {fixed}; "
            f"use max_length >= {fixed + n_fields}"
        )
    field_parts = {p.index: p for p in parts if p.kind == "field"}
    field_ids = []
    for j in range(n_fields):
        p = field_parts[j]
        space = " " if p.leading_space else ""
        texts = [space + apply_modifier(t, p.modifier) for t in examples.texts[j]]
        field_ids.append(_ids(tokenizer, texts))
    rows, mask_positions = [], []
    for n in range(len(examples)):
        sent = [field_ids[j][n] for j in range(n_fields)]
        if any(mask_id in s for s in sent):
            raise ConfigError(
                f"example {n} of task {task.name!r} contains the mask token "
                f"{tokenizer.mask_token!r} in its text; remove it, the template adds the mask"
            )
        keep = truncated_lengths([len(s) for s in sent], budget)
        ids = [cls_id]
        mask_pos = -1
        for i, p in enumerate(parts):
            if p.kind == "text":
                ids.extend(literal[i])
            elif p.kind == "mask":
                mask_pos = len(ids)
                ids.append(mask_id)
            else:
                ids.extend(sent[p.index][: keep[p.index]])
        ids.append(sep_id)
        rows.append(ids)
        mask_positions.append(mask_pos)
    return rows, [[0] * len(r) for r in rows], mask_positions


def _cls_rows(examples: Examples, tokenizer: Any, max_length: int):
    texts = [list(col) for col in examples.texts]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    rows = [list(r) for r in enc["input_ids"]]
    if "token_type_ids" in enc:
        types = [list(t) for t in enc["token_type_ids"]]
    else:
        types = [[0] * len(r) for r in rows]
    return rows, types, [0] * len(rows)


def encode(
    examples: Examples,
    tokenizer: Any,
    task: Task,
    *,
    max_length: int,
    mode: Literal["prompt", "cls"] = "prompt",
    pad_to: Literal["max_length", "longest"] = "max_length",
    word_style: WordStyle | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes examples into a fixed-shape batch.

    Args:
      examples: N examples with ``len(task.text_fields)`` text columns.
      tokenizer: a Hugging Face tokenizer (RoBERTa-, BERT-style, ...).
      task: the task whose template is applied (prompt mode).
      max_length: the longest a row may be, special tokens included.
      mode: ``'prompt'``: the template with one mask token per row (LM-BFF); ``'cls'``: plain
        ``tokenizer(s1[, s2], truncation=True)`` for a classification head.
      pad_to: ``'max_length'`` pads every row to ``max_length`` (T = max_length: one jit
        shape for all sets); ``'longest'`` pads to the longest row rounded up to a multiple of
        8 (at most ``max_length``). Rows are truncated at ``max_length`` either way, and the
        padding is masked, so both give the same model outputs (`pad_length` turns the second
        into the first).
      word_style: the label-word style the batch will be read with (see `label_word_ids`):
        ``'leading_space'`` lets the mask absorb the space before it (RoBERTa: ``It was<mask>``
        then `` great``), ``'plain'`` keeps that space in the template. None infers it with
        `word_style_for_tokenizer`. Irrelevant for WordPiece tokenizers and in cls mode.

    Returns:
      ``input_ids`` (N, T), ``attention_mask`` (N, T), ``token_type_ids`` (N, T) (zeros in
      prompt mode and for tokenizers without token types), ``mask_pos`` (N,) (0 in cls mode)
      and ``labels`` (N,), all int32.

    Raises:
      ValueError: for an unknown mode / pad_to, a tokenizer without the needed special
        tokens, a template that does not fit ``max_length``, or a text containing the mask.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if pad_to not in PAD_TO:
        raise ConfigError(f"pad_to must be one of {PAD_TO}, got {pad_to!r}")
    if len(examples.texts) != len(task.text_fields):
        raise ConfigError(
            f"examples have {len(examples.texts)} text columns but task {task.name!r} has "
            f"{len(task.text_fields)} ({task.text_fields})"
        )
    pad_id = _special_id(tokenizer, "pad")
    if mode == "prompt":
        style = word_style_for_tokenizer(tokenizer) if word_style is None else word_style
        check_word_style(style)
        rows, types, mask_positions = _prompt_rows(examples, tokenizer, task, max_length, style)
    else:
        rows, types, mask_positions = _cls_rows(examples, tokenizer, max_length)
    longest = max((len(r) for r in rows), default=1)
    if pad_to == "max_length":
        length = max_length
    else:
        length = min(max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    n = len(rows)
    input_ids = np.full((n, length), pad_id, dtype=np.int32)  # (N, T)
    attention_mask = np.zeros((n, length), dtype=np.int32)  # (N, T)
    token_type_ids = np.zeros((n, length), dtype=np.int32)  # (N, T)
    for i, (ids, tt) in enumerate(zip(rows, types, strict=True)):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        token_type_ids[i, : len(tt)] = tt
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "mask_pos": np.asarray(mask_positions, dtype=np.int32).reshape(n),
        "labels": examples.labels.astype(np.int32),
    }


def pad_length(batch: Mapping[str, np.ndarray], length: int, pad_id: int) -> dict:
    """``batch`` with its token arrays padded on the right to ``length`` columns.

    ``input_ids`` gets ``pad_id``, ``attention_mask`` and ``token_type_ids`` 0: the arrays
    `encode` gives with T = ``length`` (so batches encoded with ``pad_to='longest'`` can be
    brought to one T, e.g. to stack them). Other arrays are kept.

    Args:
      batch: an `encode` batch (``input_ids`` (N, T), ...).
      length: the new T, at least the current one.
      pad_id: the tokenizer's pad token id.

    Returns:
      A new dict; the token arrays are (N, ``length``).

    Raises:
      ConfigError: if ``length`` is shorter than the batch's T.
    """
    width = np.shape(batch["input_ids"])[1]
    if length < width:
        raise ConfigError(
            f"cannot pad a batch of {width} tokens to {length}: padding only adds columns; "
            f"use a length >= {width}"
        )
    fill = {"input_ids": pad_id}
    return {
        key: np.pad(
            np.asarray(value), ((0, 0), (0, length - width)), constant_values=fill.get(key, 0)
        )
        if key in TOKEN_KEYS
        else value
        for key, value in batch.items()
    }


def label_word_ids(tokenizer: Any, task: Task, word_style: WordStyle | None = None) -> np.ndarray:
    """Returns the vocabulary id of each label word.

    Args:
      tokenizer: a Hugging Face tokenizer.
      task: the task whose `Task.label_words` are looked up.
      word_style: ``'leading_space'`` (RoBERTa: ``" great"``) or ``'plain'`` (BERT:
        ``"great"``); None infers it with `word_style_for_tokenizer`. Prefer passing
        ``word_style_for(config.model_type)``, and the same style to `encode`.

    Returns:
      (K,) int32 ids, in class order.

    Raises:
      ValueError: if a word is not exactly one token (the message gives its tokenization) or
        is the unknown token.
    """
    style = word_style_for_tokenizer(tokenizer) if word_style is None else word_style
    check_word_style(style)
    ids = []
    for word in task.words(style):
        pieces = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        unknown = tokenizer.unk_token_id is not None and pieces == [tokenizer.unk_token_id]
        if unknown:
            raise ConfigError(
                f"label word {word!r} of task {task.name!r} is not in the vocabulary of "
                f"{type(tokenizer).__name__}: it maps to the unknown token "
                f"{tokenizer.unk_token!r}. Choose a word this vocabulary has, or another model"
            )
        if len(pieces) != 1:
            tokens = tokenizer.convert_ids_to_tokens(pieces)
            raise ConfigError(
                f"label word {word!r} of task {task.name!r} is {len(pieces)} tokens {tokens} "
                f"with {type(tokenizer).__name__} (word_style={style!r}), but prompt-based "
                "fine-tuning reads one logit per word: choose a word that is a single token in "
                "this vocabulary, check word_style matches the model, or use another model"
            )
        ids.append(pieces[0])
    return np.asarray(ids, dtype=np.int32)
