"""Encoder hyper-parameters, read from and written to Hugging Face ``config.json`` dicts."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from lora_jax.errors import ConfigError

MODEL_TYPES = ("roberta", "bert", "electra", "deberta-v2")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh")


class Head(enum.StrEnum):
    """The output head of an encoder (None: hidden states, no head).

    ``MLM``: masked-language-model logits (prompt-based fine-tuning reads label words there);
    ``CLS``: HF's sequence-classification head on ``<s>`` / ``[CLS]``; ``RTD``: ELECTRA's
    replaced-token-detection discriminator. Plain strings (``'mlm'``) are accepted and compare
    equal to their member.
    """

    MLM = "mlm"
    CLS = "cls"
    RTD = "rtd"


POS_ATT_TYPES = ("c2p", "p2c")
# HF attribute name of the encoder body per model_type.
_BASE_PREFIX = {"roberta": "roberta", "bert": "bert", "electra": "electra", "deberta-v2": "deberta"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Shape and behaviour of a RoBERTa, BERT, ELECTRA or DeBERTa-v2/v3 encoder (``config.json``).

    Attributes:
      model_type: ``'roberta'`` (position ids offset by ``pad_token_id``), ``'bert'``,
        ``'electra'`` (BERT body, embeddings of width ``embedding_size`` projected to
        ``hidden_size``) or ``'deberta-v2'`` (DeBERTa-v2 and -v3: disentangled attention).
      vocab_size: number of token embeddings V.
      hidden_size: width H of the residual stream.
      num_hidden_layers: number of transformer blocks.
      num_attention_heads: heads per block; must divide ``hidden_size``.
      intermediate_size: width of the feed-forward block.
      hidden_act: feed-forward activation; HF ``'gelu'`` is the exact erf GELU.
      hidden_dropout_prob: dropout on embeddings and block outputs (training only).
      attention_probs_dropout_prob: dropout on attention probabilities (training only).
      max_position_embeddings: rows of the position table (RoBERTa: max length + 2).
      type_vocab_size: rows of the token-type table (RoBERTa checkpoints have 1).
      layer_norm_eps: LayerNorm epsilon.
      pad_token_id: padding token id; RoBERTa's ``padding_idx`` for position ids.
      initializer_range: standard deviation of the normal init of new weights.
      classifier_dropout: dropout of the classification head; None means ``hidden_dropout_prob``.
      tie_word_embeddings: MLM decoder shares the word-embedding matrix (HF default).
      bos_token_id: kept for the HF config round trip.
      eos_token_id: kept for the HF config round trip.
      embedding_size: width E of the token embeddings (ELECTRA, DeBERTa); None means
        ``hidden_size``. With E != H, ELECTRA has ``embeddings_project`` and DeBERTa
        ``embed_proj``.
      relative_attention: DeBERTa: disentangled attention with relative position embeddings.
      max_relative_positions: DeBERTa: relative distance range; < 1 means
        ``max_position_embeddings``.
      position_buckets: DeBERTa: number of log buckets of relative distances (v3: 256); <= 0
        means no bucketing.
      pos_att_type: DeBERTa: the relative terms, a subset of ``('c2p', 'p2c')``.
      share_att_key: DeBERTa: position keys / queries reuse ``key_proj`` / ``query_proj``
        (v3) instead of ``pos_key_proj`` / ``pos_query_proj``.
      position_biased_input: DeBERTa: add absolute position embeddings to the input (v3: no).
      norm_rel_ebd: DeBERTa: ``'layer_norm'`` normalizes the relative embeddings (v3), or
        ``'none'``.
      pooler_hidden_size: DeBERTa ContextPooler width; None means ``hidden_size``.
      pooler_hidden_act: DeBERTa ContextPooler activation.
      pooler_dropout: DeBERTa ContextPooler dropout.
      legacy: DeBERTa MLM head layout: True ``cls.predictions.*`` (transformers' default),
        False ``lm_predictions.lm_head.*`` (the layout of Microsoft's DeBERTa v1/v2 weights).
    """

    model_type: str = "roberta"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    embedding_size: int | None = None
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    position_biased_input: bool = True
    norm_rel_ebd: str = "none"
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    legacy: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"EncoderConfig.model_type={self.model_type!r} is not supported; "
                f"expected one of {MODEL_TYPES}. lora_jax.models implements RoBERTa, BERT, "
                "ELECTRA and DeBERTa-v2/v3 encoders (MiniLM is a BERT)."
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(
                f"EncoderConfig.hidden_act={self.hidden_act!r} is not supported; "
                f"expected one of {HIDDEN_ACTS}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "embedding_size",
            "pooler_hidden_size",
        ):
            value = getattr(self, name)
            if value is None and name in ("embedding_size", "pooler_hidden_size"):
                continue
            zero_ok = name == "type_vocab_size" and self.model_type == "deberta-v2"
            if not isinstance(value, int) or value < (0 if zero_ok else 1):
                raise ConfigError(f"EncoderConfig.{name}={value!r} must be a positive integer.")
        bad = [t for t in self.pos_att_type if t not in POS_ATT_TYPES]
        if bad or not isinstance(self.pos_att_type, tuple):
            raise ConfigError(
                f"EncoderConfig.pos_att_type={self.pos_att_type!r}; expected a tuple of terms "
                f"from {POS_ATT_TYPES} (config.json spells it 'p2c|c2p')."
            )
        if self.pooler_hidden_act not in HIDDEN_ACTS:
            raise ConfigError(
                f"EncoderConfig.pooler_hidden_act={self.pooler_hidden_act!r} is not supported; "
                f"expected one of {HIDDEN_ACTS}."
            )
        if self.norm_rel_ebd not in ("none", "layer_norm"):
            raise ConfigError(
                f"EncoderConfig.norm_rel_ebd={self.norm_rel_ebd!r}; expected 'none' or "
                "'layer_norm'."
            )
        if self.model_type == "deberta-v2" and (self.pooler_hidden_size or self.hidden_size) != (
            self.hidden_size
        ):
            raise ConfigError(
                f"EncoderConfig.pooler_hidden_size={self.pooler_hidden_size} differs from "
                f"hidden_size={self.hidden_size}; transformers' ContextPooler then fails too. "
                "Remove pooler_hidden_size from config.json."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose a head count that "
                "divides the hidden size."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"EncoderConfig.{name}={value!r} must be in [0, 1).")
        if self.pad_token_id is None or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"EncoderConfig.pad_token_id={self.pad_token_id!r} must be a token id in "
                f"[0, vocab_size={self.vocab_size})."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @property
    def base_prefix(self) -> str:
        """HF attribute name of the encoder body: roberta, bert, electra or deberta."""
        return _BASE_PREFIX[self.model_type]

    @property
    def embed_dim(self) -> int:
        """Width E of the token embeddings (``embedding_size``, else ``hidden_size``)."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def max_tokens(self) -> int | None:
        """The most tokens a row may have: the rows of the absolute position table (RoBERTa:
        less its ``pad_token_id + 1`` offset, so 512 of 514), or None where positions are only
        relative (DeBERTa-v3, ``position_biased_input=False``)."""
        if self.model_type == "deberta-v2" and not self.position_biased_input:
            return None
        offset = self.pad_token_id + 1 if self.model_type == "roberta" else 0
        return self.max_position_embeddings - offset

    @property
    def attention_span(self) -> int:
        """DeBERTa's relative span S: the relative embedding table has 2 S rows."""
        if self.position_buckets > 0:
            return self.position_buckets
        return (
            self.max_position_embeddings
            if self.max_relative_positions < 1
            else (self.max_relative_positions)
        )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> EncoderConfig:
        """Builds a config from a Hugging Face ``config.json`` dict.

        Raises:
          ValueError: for a ``model_type`` other than roberta / bert, or a relative position
            embedding type, naming what was found and what is supported.
        """
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"Unsupported model_type {model_type!r} in config.json; lora_jax.models supports "
                f"{MODEL_TYPES}. Use a RoBERTa, BERT, ELECTRA or DeBERTa-v2/v3 checkpoint "
                "(MiniLM is a BERT)."
            )
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(
                f"config.json has position_embedding_type={position_type!r}; only 'absolute' "
                "position embeddings are implemented."
            )
        if (hf.get("conv_kernel_size") or 0) > 0:  # DeBERTa-v2 xlarge / xxlarge
            raise ConfigError(
                f"config.json has conv_kernel_size={hf['conv_kernel_size']}; DeBERTa's "
                "convolution layer is not implemented (DeBERTa-v3 checkpoints have none)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs["model_type"] = model_type
        kwargs.setdefault("tie_word_embeddings", True)
        # Keys absent from config.json take transformers' class defaults, as HF would.
        defaults = {"max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
        if model_type == "bert":
            defaults |= {"pad_token_id": 0, "vocab_size": 30522}
        elif model_type == "electra":
            defaults |= {"pad_token_id": 0, "vocab_size": 30522, "embedding_size": 128}
            defaults |= {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}
        elif model_type == "deberta-v2":
            defaults = {"max_position_embeddings": 512, "type_vocab_size": 0, "pad_token_id": 0}
            defaults |= {"layer_norm_eps": 1e-7, "vocab_size": 128100, "hidden_size": 1536}
            defaults |= {"num_hidden_layers": 24, "num_attention_heads": 24}
            defaults |= {"intermediate_size": 6144}
            if hf.get("cls_dropout") is not None:
                kwargs["classifier_dropout"] = hf["cls_dropout"]
            att = hf.get("pos_att_type") or ()
            if isinstance(att, str):
                att = [t.strip() for t in att.lower().split("|")]
            kwargs["pos_att_type"] = tuple(att)
            norm = hf.get("norm_rel_ebd", "none")
            kwargs["norm_rel_ebd"] = "layer_norm" if "layer_norm" in norm.lower() else "none"
        else:
            defaults |= {"pad_token_id": 1, "vocab_size": 50265, "bos_token_id": 0}
            defaults |= {"eos_token_id": 2}
        if model_type != "deberta-v2":
            for key in _DEBERTA_FIELDS:
                kwargs.pop(key, None)
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads (without ``architectures``)."""
        out: dict[str, Any] = dataclasses.asdict(self)
        for key in ("bos_token_id", "eos_token_id", "embedding_size", "pooler_hidden_size"):
            if out[key] is None:
                del out[key]
        if self.model_type == "deberta-v2":
            out["pos_att_type"] = list(self.pos_att_type)
            out["cls_dropout"] = out.pop("classifier_dropout")
        else:
            for key in _DEBERTA_FIELDS:
                out.pop(key, None)
            out["position_embedding_type"] = "absolute"
        return out


_DEBERTA_FIELDS = (
    "relative_attention",
    "max_relative_positions",
    "position_buckets",
    "pos_att_type",
    "share_att_key",
    "position_biased_input",
    "norm_rel_ebd",
    "pooler_hidden_size",
    "pooler_hidden_act",
    "pooler_dropout",
    "legacy",
)
