"""lora_jax: functional LoRA fine-tuning of Flax encoders.

Subpackages and modules, each one idea:

- :mod:`lora_jax.models`: own Flax NNX RoBERTa / BERT encoders that load and save Hugging Face
  checkpoints; ``split(model) -> (apply_fn, params)`` with params as HF-named nested dicts.
- :mod:`lora_jax.lora`: LoRA as a pure transform of parameter pytrees (PEFT semantics and files).
- :mod:`lora_jax.tasks`: few-shot prompt-based tasks (templates, label words, k-shot sampling).
- :mod:`lora_jax.task_model`: from an encoder to the K outputs, and what is trained.
- :mod:`lora_jax.train`: the optax training loop (with :mod:`lora_jax.losses` and
  :mod:`lora_jax.checkpoint`).
- :mod:`lora_jax.params`: dotted paths over parameter pytrees.
"""

from lora_jax import checkpoint, lora, losses, models, params, task_model, tasks, train
from lora_jax.lora import LoraConfig
from lora_jax.models import from_pretrained, split
from lora_jax.task_model import Method, Readout, make_model_fn, make_output_fn
from lora_jax.train import TrainConfig, TrainState, fit

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "Method",
    "Readout",
    "TrainConfig",
    "TrainState",
    "checkpoint",
    "fit",
    "from_pretrained",
    "lora",
    "losses",
    "make_model_fn",
    "make_output_fn",
    "models",
    "params",
    "split",
    "task_model",
    "tasks",
    "train",
]
