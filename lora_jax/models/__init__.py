"""Own Flax NNX RoBERTa, BERT, ELECTRA and DeBERTa-v2/v3 encoders, and HF checkpoint conversion.

Example:
  >>> from lora_jax import models
  >>> model = models.from_pretrained(models.minilm_path(), head=None)  # offline, no torch
  >>> tok = models.load_tokenizer(models.minilm_path())
  >>> batch = tok(["a fine film", "no"], padding=True, return_tensors="np")
  >>> model(batch["input_ids"], batch["attention_mask"]).shape
  (2, 5, 384)
  >>> apply_fn, params = models.split(model)  # pure function + nested dict of arrays
"""

from lora_jax.models.config import EncoderConfig, Head
from lora_jax.models.convert import CheckpointError, MissingHeadError
from lora_jax.models.encoder import (
    EncoderModel,
    cls_head,
    create,
    forward,
    logical_axes,
    split,
)
from lora_jax.models.layers import dense, embed
from lora_jax.models.pretrained import (
    from_pretrained,
    load_peft_model,
    load_tokenizer,
    minilm_path,
    read_model_type,
    read_torch_bin,
    save_pretrained,
)

__all__ = [
    "CheckpointError",
    "EncoderConfig",
    "EncoderModel",
    "Head",
    "MissingHeadError",
    "cls_head",
    "create",
    "dense",
    "embed",
    "forward",
    "from_pretrained",
    "load_peft_model",
    "load_tokenizer",
    "logical_axes",
    "minilm_path",
    "read_model_type",
    "read_torch_bin",
    "save_pretrained",
    "split",
]
