"""Hugging Face <-> lora_jax parameter names and layouts, with explicit checks.

The whole conversion is a handful of rules, listed here once:

===================================  ===========================  ===========
HF PyTorch key                       lora_jax path                layout
===================================  ===========================  ===========
``<Linear>.weight`` (out, in)        ``<Linear>.kernel``          transposed
``<Linear>.bias``                    ``<Linear>.bias``            same
``<LayerNorm>.weight`` / ``gamma``   ``<LayerNorm>.scale``        same
``<LayerNorm>.bias`` / ``beta``      ``<LayerNorm>.bias``         same
``<Embedding>.weight``               ``<Embedding>.embedding``    same
``lm_head.bias``                     ``lm_head.bias``             same
``cls.predictions.bias``             ``cls.predictions.bias``     same
``generator_lm_head.bias``           ``generator_lm_head.bias``   same
===================================  ===========================  ===========

The encoder body lives under ``roberta.`` / ``bert.`` / ``electra.`` / ``deberta.``;
checkpoints of a bare ``BertModel`` / ``RobertaModel`` (MiniLM) have no prefix, and both forms
load. Tied MLM decoder weights (``lm_head.decoder.weight``, ``cls.predictions.decoder.weight``,
ELECTRA's ``generator_lm_head.weight`` and the decoder biases that HF ties to the head bias),
``position_ids`` buffers, BERT's next-sentence head, DeBERTa's ``mask_predictions.*`` and its
unused absolute ``position_embeddings`` (``position_biased_input=false``) are not parameters
here and are skipped, as transformers skips them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lora_jax.errors import InputFileError
from lora_jax.models.config import EncoderConfig, Head
from lora_jax.models.encoder import param_shapes

_NORMS = ("LayerNorm", "layer_norm")
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "rel_embeddings")
_HEAD_PREFIXES = ("lm_head.", "cls.", "classifier.")
_HEAD_PREFIXES += ("generator_predictions.", "generator_lm_head.", "discriminator_predictions.")
_HEAD_PREFIXES += ("lm_predictions.", "pooler.")  # DeBERTa (its ContextPooler is top-level)
_IGNORED_SUFFIXES = ("position_ids",)
_IGNORED_PREFIXES = ("cls.seq_relationship.", "mask_predictions.")  # BERT NSP, DeBERTa


class CheckpointError(InputFileError):
    """A checkpoint that cannot be read, or does not fit the model its config describes."""


class MissingHeadError(CheckpointError):
    """A checkpoint without the weights of the head that was asked for (e.g. no MLM head)."""


def _leaf_from_hf(module: str, leaf: str) -> tuple[str, bool]:
    """Our leaf name for HF ``module.leaf``, and whether the array is transposed."""
    last = module.rsplit(".", 1)[-1]
    if last in _NORMS:
        return {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}[leaf], False
    if last in _EMBEDDINGS:
        return "embedding", False
    if leaf == "weight":
        return "kernel", True
    return leaf, False


def _leaf_to_hf(module: str, leaf: str) -> tuple[str, bool]:
    last = module.rsplit(".", 1)[-1]
    if last in _NORMS:
        return {"scale": "weight", "bias": "bias"}[leaf], False
    if leaf == "embedding":
        return "weight", False
    if leaf == "kernel":
        return "weight", True
    return leaf, False


def _our_path(key: str, config: EncoderConfig) -> str | None:
    """Module path of HF ``key`` (without leaf) in our tree, or None when it is skipped."""
    prefix = config.base_prefix
    if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
        return None
    if not config.position_biased_input and "embeddings.position_embeddings." in key:
        return None  # DeBERTa without absolute positions (HF ignores these weights too)
    if key.startswith(f"{prefix}."):
        return key
    body = ("embeddings.", "encoder.", "embeddings_project.")
    if key.startswith(body) or key.startswith("pooler.") and prefix == "bert":
        return f"{prefix}.{key}"
    if key.startswith(_HEAD_PREFIXES):
        return key
    return key  # reported as unexpected by the caller


def hf_to_flat(
    state: Mapping[str, np.ndarray], config: EncoderConfig
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames and transposes an HF state dict into our flat dotted paths.

    Tied decoder weights are dropped (the decoder reads the word embeddings); an untied decoder
    (``tie_word_embeddings=false``) becomes ``<head>.decoder.kernel``. A decoder bias is used as
    the head bias only when the head bias itself is absent (old checkpoints).

    Returns:
      ``(flat, unexpected)``: converted arrays by dotted path, and HF keys that belong to no
      known module (for the caller to report).
    """
    prefix = config.base_prefix
    flat: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    decoder_bias: dict[str, np.ndarray] = {}
    known_roots = (f"{prefix}.", *_HEAD_PREFIXES)
    for key, value in state.items():
        path = _our_path(key, config)
        if path is None:
            continue
        if not path.startswith(known_roots) or "." not in path:
            unexpected.append(key)
            continue
        module, leaf = path.rsplit(".", 1)
        if module.endswith(("lm_head.decoder", "predictions.decoder")):
            head_module = module.rsplit(".", 1)[0]
            if leaf == "bias":
                decoder_bias[f"{head_module}.bias"] = np.asarray(value)
                continue
            if config.tie_word_embeddings:
                continue
        if module == "generator_lm_head" and leaf == "weight" and config.tie_word_embeddings:
            continue
        if leaf not in ("weight", "bias", "gamma", "beta"):
            unexpected.append(key)
            continue
        name, transpose = _leaf_from_hf(module, leaf)
        array = np.asarray(value)
        flat[f"{module}.{name}"] = array.T if transpose else array
    for path, bias in decoder_bias.items():
        flat.setdefault(path, bias)
    return flat, unexpected


def flat_to_hf(
    flat: Mapping[str, np.ndarray], config: EncoderConfig, *, head: Head | str | None
) -> dict:
    """Our flat params -> HF state dict (keys and layouts transformers 5 writes and reads).

    A model without head is saved as a bare ``BertModel`` / ``RobertaModel`` (no prefix). Tied
    decoder weights are not written: transformers re-ties them on load.
    """
    prefix = config.base_prefix
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        module, leaf = path.rsplit(".", 1)
        if leaf.startswith("lora_"):
            raise CheckpointError(
                f"Parameter {path!r} is a fused LoRA leaf; merge the adapters first "
                "(lora_jax.lora.merge) or save them with lora_jax.lora.save_peft."
            )
        name, transpose = _leaf_to_hf(module, leaf)
        key = f"{module}.{name}"
        if head is None and key.startswith(f"{prefix}."):
            key = key[len(prefix) + 1 :]
        array = np.asarray(value)
        out[key] = np.ascontiguousarray(array.T if transpose else array)
    return out


def check_shapes(
    flat: Mapping[str, np.ndarray],
    config: EncoderConfig,
    *,
    head: Head | str | None,
    num_labels: int | None,
    pooler: bool,
    source: str,
) -> list[str]:
    """Compares converted arrays with the shapes the config implies.

    Returns:
      Paths the model needs but the checkpoint lacks (the caller decides which may be
      initialized fresh).

    Raises:
      CheckpointError: listing every shape mismatch, or every unexpected key.
    """
    expected = param_shapes(config, head=head, num_labels=num_labels, pooler=pooler)
    mismatched = [
        f"{p}: checkpoint {tuple(np.shape(v))}, config expects {expected[p]}"
        for p, v in flat.items()
        if p in expected and tuple(np.shape(v)) != expected[p]
    ]
    if mismatched:
        raise CheckpointError(
            f"Checkpoint {source} does not match its config.json: {len(mismatched)} shape "
            f"mismatch(es) (our layout, Linear kernels are (in, out)):\n  "
            + "\n  ".join(mismatched[:20])
            + "\nFix config.json (hidden_size, vocab_size, num_labels, ...) or the weights so "
            "they describe the same model."
        )
    return sorted(set(expected) - set(flat))
