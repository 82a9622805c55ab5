"""Few-shot tasks: examples, prompt templates and label words.

A `Task` names its text fields, its classes, one verbalizer word per class and a prompt
template. Templates are written once for every tokenizer: placeholders stand for the sentences
and the mask, and the tokenizer's own special tokens (``<s>``/``[CLS]``, ``<mask>``/``[MASK]``,
``</s>``/``[SEP]``) are inserted by `lora_jax.tasks.encode`.

Template syntax (LM-BFF's templates, Gao et al. 2021, written with ``str.format``-like fields):

- ``{0}``, ``{1}``: the task's text fields in order. ``{0|rstrip_punct}`` drops trailing
  punctuation (LM-BFF's ``*sent-_0*``), ``{1|lower_first}`` lowercases the first character
  (``*sentl_1*``).
- ``{mask}``: the mask token; exactly one per template. With ``word_style='leading_space'``
  the white space before it is dropped (RoBERTa's ``<mask>`` absorbs the preceding space and
  the label word, ``" great"``, carries it); with ``'plain'`` it stays in the template text
  (a WordPiece tokenizer makes no token of it, so BERT-style encodings are the same either way).
- Everything else is literal text, tokenized as is (``" It was"`` -> ``Ġ It``, ``Ġ was``).

Label words are stored bare (``"great"``). `WordStyle` says how a tokenizer spells a word
that follows a space: ``'leading_space'`` for byte-level BPE vocabularies (RoBERTa, GPT-2,
BART: ``" great"`` -> ``Ġgreat``), ``'plain'`` for WordPiece (BERT, ELECTRA: ``"great"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from lora_jax.errors import ConfigError

WordStyle = Literal["leading_space", "plain"]
WORD_STYLES: tuple[str, ...] = ("leading_space", "plain")

# model_type (HF config.json) -> how label words are spelled after a space.
_MODEL_TYPE_WORD_STYLE: dict[str, WordStyle] = {
    "roberta": "leading_space",
    "xlm-roberta": "leading_space",
    "camembert": "leading_space",
    "longformer": "leading_space",
    "bart": "leading_space",
    "gpt2": "leading_space",
    "deberta": "leading_space",
    "deberta-v2": "leading_space",
    "bert": "plain",
    "distilbert": "plain",
    "electra": "plain",
    "albert": "plain",
    "mpnet": "plain",
    "megatron-bert": "plain",
}

TEMPLATE_MODIFIERS: tuple[str, ...] = ("rstrip_punct", "lower_first")
_PLACEHOLDER = re.compile(r"\{(\d+|mask)(?:\|(\w+))?\}")
_TRAILING_PUNCT = ".?!,;:"


def word_style_for(model_type: str) -> WordStyle:
    """Returns the label-word style of a Hugging Face ``model_type``.

    Args:
      model_type: ``config.model_type``, e.g. ``'roberta'`` or ``'bert'``.

    Returns:
      ``'leading_space'`` for byte-level BPE / SentencePiece vocabularies, ``'plain'`` for
      WordPiece ones.

    Raises:
      ValueError: for a model type not in the table; the message lists the known ones.
    """
    try:
        return _MODEL_TYPE_WORD_STYLE[model_type]
    except KeyError:
        raise ConfigError(
            f"unknown model_type {model_type!r} for choosing the label-word style; known: "
            f"{sorted(_MODEL_TYPE_WORD_STYLE)}. Pass word_style='leading_space' (byte-level "
            "BPE, words follow a space) or 'plain' (WordPiece) explicitly, or use "
            "word_style_for_tokenizer(tokenizer)."
        ) from None


def word_style_for_tokenizer(tokenizer: Any) -> WordStyle:
    """Infers the label-word style from a tokenizer.

    The style is ``'leading_space'`` when the tokenizer spells a word after a space
    differently from the bare word (``" great"`` -> ``Ġgreat`` but ``"great"`` -> ``great``,
    as byte-level BPE does), and ``'plain'`` when it does not (WordPiece ignores the space).

    Args:
      tokenizer: a Hugging Face tokenizer.

    Returns:
      ``'leading_space'`` or ``'plain'``.
    """
    spaced = tokenizer(" great", add_special_tokens=False)["input_ids"]
    bare = tokenizer("great", add_special_tokens=False)["input_ids"]
    return "leading_space" if list(spaced) != list(bare) else "plain"


def check_word_style(word_style: str) -> WordStyle:
    """Returns ``word_style`` if valid, else raises ValueError naming the allowed values."""
    if word_style not in WORD_STYLES:
        raise ConfigError(f"word_style must be one of {WORD_STYLES}, got {word_style!r}")
    return word_style  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Examples:
    """A column-oriented set of labelled examples.

    Attributes:
      texts: one tuple of N strings per text field (1 for single-sentence tasks, 2 for pairs).
      labels: (N,) int32 class indices in ``[0, K)``.
    """

    texts: tuple[tuple[str, ...], ...]
    labels: np.ndarray

    def __post_init__(self) -> None:
        texts = tuple(tuple(str(s) for s in col) for col in self.texts)
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
            raise ConfigError(
                f"labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype}"
            )
        if not texts:
            raise ConfigError("texts must hold at least one text column, got none")
        lengths = {len(col) for col in texts}
        if lengths != {labels.shape[0]}:
            raise ConfigError(
                f"every text column must have one entry per label ({labels.shape[0]}), got "
                f"column lengths {[len(col) for col in texts]}"
            )
        labels = labels.astype(np.int32)  # a private copy, read-only: loaders cache Examples
        labels.flags.writeable = False
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: Sequence[int] | np.ndarray) -> Examples:
        """Returns the examples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Examples(
            texts=tuple(tuple(col[i] for i in idx) for col in self.texts),
            labels=self.labels[idx],
        )

    def rows(self) -> list[tuple[tuple[str, ...], int]]:
        """Returns ``[(texts, label), ...]``, one tuple of strings and an int per example."""
        return [
            (tuple(col[i] for col in self.texts), int(self.labels[i])) for i in range(len(self))
        ]


class TaskData(NamedTuple):
    """The labelled splits of a task: ``train`` (to sample from) and ``test``."""

    train: Examples
    test: Examples


class TemplatePart(NamedTuple):
    """One piece of a parsed template.

    ``kind`` is ``'text'`` (literal ``text``), ``'field'`` (text field ``index``, with
    ``modifier``) or ``'mask'``; ``leading_space`` says whether the template had white space
    right before a field or the mask.
    """

    kind: str
    text: str = ""
    index: int = -1
    modifier: str = ""
    leading_space: bool = False


def parse_template(template: str, num_fields: int) -> tuple[TemplatePart, ...]:
    """Splits a template into literal text, text fields and the mask.

    Args:
      template: e.g. ``"{0} It was {mask} ."``.
      num_fields: number of text fields; every one must appear exactly once.

    Returns:
      The parts in order; empty literals are dropped.

    Raises:
      ValueError: if the template lacks the mask or has it twice, references a missing field,
        omits or repeats a field, or uses an unknown modifier.
    """
    parts: list[TemplatePart] = []
    pending = ""  # literal text not yet emitted
    pos = 0
    seen: list[int | str] = []
    for m in _PLACEHOLDER.finditer(template):
        pending += template[pos : m.start()]
        pos = m.end()
        name, modifier = m.group(1), m.group(2) or ""
        stripped = pending.rstrip()
        space_before = len(stripped) != len(pending)
        if stripped:
            parts.append(TemplatePart("text", text=stripped))
        pending = ""
        if name == "mask":
            if modifier:
                raise ConfigError(f"{{mask}} takes no modifier, got {m.group(0)!r} in {template!r}")
            parts.append(TemplatePart("mask", leading_space=space_before))
            seen.append("mask")
            continue
        index = int(name)
        if index >= num_fields:
            raise ConfigError(
                f"template {template!r} uses field {{{index}}} but the task has {num_fields} "
                f"text field(s): use {{0}}..{{{num_fields - 1}}}"
            )
        if modifier and modifier not in TEMPLATE_MODIFIERS:
            raise ConfigError(
                f"unknown template modifier {modifier!r} in {m.group(0)!r}; "
                f"allowed: {TEMPLATE_MODIFIERS}"
            )
        parts.append(
            TemplatePart("field", index=index, modifier=modifier, leading_space=space_before)
        )
        seen.append(index)
    pending += template[pos:]
    if pending:
        parts.append(TemplatePart("text", text=pending.rstrip()))
    if seen.count("mask") != 1:
        raise ConfigError(
            f"template must contain exactly one {{mask}}, got {seen.count('mask')} in {template!r}"
        )
    fields = sorted(i for i in seen if i != "mask")
    if fields != list(range(num_fields)):
        raise ConfigError(
            f"template {template!r} must use each text field {{0}}..{{{num_fields - 1}}} "
            f"exactly once, got fields {fields}"
        )
    return tuple(p for p in parts if p.kind != "text" or p.text)


def apply_modifier(text: str, modifier: str) -> str:
    """Applies a template modifier (``''``, ``'rstrip_punct'``, ``'lower_first'``) to a text."""
    text = text.strip()
    if modifier == "rstrip_punct":
        return text.rstrip(_TRAILING_PUNCT).rstrip()
    if modifier == "lower_first":
        return text[:1].lower() + text[1:]
    return text


@dataclass(frozen=True, kw_only=True)
class Task:
    """A few-shot classification task.

    Attributes:
      name: registry name, e.g. ``'mr'``.
      text_fields: names of the text fields, one (``('sentence',)``) or two.
      label_names: the K class names; class i is label index i.
      label_words: the K bare verbalizer words (``('terrible', 'great')``); see `words`.
      template: prompt template, e.g. ``'{0} It was {mask} .'`` (syntax in the module doc).
      loader: zero-argument function returning the task's `TaskData`.
      source: where the data comes from (for reports).
      needs_hub: True when `load` downloads through ``datasets.load_dataset``.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    loader: Callable[[], TaskData] = field(compare=False, repr=False)
    source: str = ""
    needs_hub: bool = False

    def __post_init__(self) -> None:
        for name in ("text_fields", "label_names", "label_words"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.text_fields) not in (1, 2):
            raise ConfigError(
                f"text_fields must name 1 or 2 fields, got {len(self.text_fields)}: "
                f"{self.text_fields}"
            )
        if len(self.label_names) < 2:
            raise ConfigError(f"label_names needs at least 2 classes, got {self.label_names}")
        if len(self.label_words) != len(self.label_names):
            raise ConfigError(
                f"label_words must have one word per class ({len(self.label_names)}: "
                f"{self.label_names}), got {len(self.label_words)}: {self.label_words}"
            )
        for word in self.label_words:
            if not word or word != word.strip():
                raise ConfigError(
                    f"label words are stored bare (no surrounding spaces; word_style adds the "
                    f"leading space), got {word!r}"
                )
        parse_template(self.template, len(self.text_fields))

    @property
    def num_labels(self) -> int:
        """K, the number of classes."""
        return len(self.label_names)

    @property
    def template_parts(self) -> tuple[TemplatePart, ...]:
        """The parsed template (see `parse_template`)."""
        return parse_template(self.template, len(self.text_fields))

    def words(self, word_style: WordStyle) -> tuple[str, ...]:
        """Returns the K label words as the tokenizer should see them.

        Args:
          word_style: ``'leading_space'`` gives ``(" terrible", " great")``, ``'plain'`` gives
            ``("terrible", "great")``.
        """
        check_word_style(word_style)
        prefix = " " if word_style == "leading_space" else ""
        return tuple(prefix + w for w in self.label_words)

    def load(self) -> TaskData:
        """Loads the labelled train and test splits."""
        data = self.loader()
        for split, examples in (("train", data.train), ("test", data.test)):
            if len(examples.texts) != len(self.text_fields):
                raise ConfigError(
                    f"task {self.name!r} {split} split has {len(examples.texts)} text columns, "
                    f"expected {len(self.text_fields)} ({self.text_fields})"
                )
            if len(examples) and (
                examples.labels.min() < 0 or examples.labels.max() >= self.num_labels
            ):
                raise ConfigError(
                    f"task {self.name!r} {split} labels must lie in [0, {self.num_labels}), got "
                    f"[{examples.labels.min()}, {examples.labels.max()}]"
                )
        return data
