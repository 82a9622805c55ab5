"""Encoder hyper-parameters, read from and written to Hugging Face ``config.json`` dicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_jax.errors import ConfigError

MODEL_TYPES = ("roberta", "bert")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
HEADS = ("mlm", "cls", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Shape and behaviour of a RoBERTa or BERT encoder (the fields of HF ``config.json``).

    Attributes:
      model_type: ``'roberta'`` (position ids offset by ``pad_token_id``) or ``'bert'``.
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

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"EncoderConfig.model_type={self.model_type!r} is not supported; "
                f"expected one of {MODEL_TYPES}. lora_jax.models implements RoBERTa and BERT "
                "encoders (MiniLM is a BERT)."
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
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"EncoderConfig.{name}={value!r} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose a head count that "
                "divides the hidden size."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
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
        """HF attribute name of the encoder body: ``'roberta'`` or ``'bert'``."""
        return self.model_type

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
                f"{MODEL_TYPES}. Use a RoBERTa or BERT checkpoint (MiniLM is a BERT)."
            )
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(
                f"config.json has position_embedding_type={position_type!r}; only 'absolute' "
                "position embeddings are implemented."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs["model_type"] = model_type
        kwargs.setdefault("tie_word_embeddings", True)
        # Keys absent from config.json take transformers' class defaults, as HF would.
        defaults = {"max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
        if model_type == "bert":
            defaults |= {"pad_token_id": 0, "vocab_size": 30522}
        else:
            defaults |= {"pad_token_id": 1, "vocab_size": 50265, "bos_token_id": 0}
            defaults |= {"eos_token_id": 2}
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads (without ``architectures``)."""
        out: dict[str, Any] = dataclasses.asdict(self)
        for key in ("bos_token_id", "eos_token_id"):
            if out[key] is None:
                del out[key]
        out["position_embedding_type"] = "absolute"
        return out
