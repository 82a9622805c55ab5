"""lora_jax: functional LoRA fine-tuning of Flax encoders.

Subpackages and modules, each one idea:

- :mod:`lora_jax.models`: own Flax NNX RoBERTa / BERT / ELECTRA / DeBERTa-v2 encoders that load
  and save Hugging Face checkpoints; ``split(model) -> (apply_fn, params)`` with params as
  HF-named nested dicts.
- :mod:`lora_jax.lora`: LoRA as a pure transform of parameter pytrees (PEFT semantics and files).
- :mod:`lora_jax.tasks`: few-shot prompt-based tasks (templates, label words, k-shot sampling).
- :mod:`lora_jax.readout`: how the K outputs of a task are read from an encoder.
- :mod:`lora_jax.capabilities`: what an output or model function can do, declared beside it.
- :mod:`lora_jax.trainable`: what is trained (LoRA, all weights, head) and the split.
- :mod:`lora_jax.rows`: evaluating a function over N rows in fixed, padded blocks.
- :mod:`lora_jax.packing`: padding-free training batches (rows packed end to end).
- :mod:`lora_jax.train`: the optax training loop over a job of runs (a single run is a job of
  one; a rank x seed sweep on one frozen base is a job of many), with :mod:`lora_jax.optim`,
  :mod:`lora_jax.losses` and :mod:`lora_jax.checkpoint`.
- :mod:`lora_jax.programs`: the compiled training and prediction programs and their one cache.
- :mod:`lora_jax.members`: the leading member axis of a job's pytrees.
- :mod:`lora_jax.sharding`: logical axes, rule tables and meshes (data / fsdp / tensor).
- :mod:`lora_jax.distributed`: several processes (``jax.distributed``), process 0 writes.
- :mod:`lora_jax.pooling`: sentence features for a head-only baseline, pooled as the
  checkpoint was trained.
- :mod:`lora_jax.params`: dotted paths over parameter pytrees.
- :mod:`lora_jax.errors`: the error types for bad user input (one line on the command line).
"""

from lora_jax import (
    capabilities,
    checkpoint,
    lora,
    losses,
    members,
    models,
    optim,
    packing,
    params,
    programs,
    readout,
    rows,
    tasks,
    train,
    trainable,
)
from lora_jax.lora import LoraConfig
from lora_jax.models import from_pretrained, split
from lora_jax.readout import Readout, make_output_fn
from lora_jax.train import TrainConfig, TrainState, fit, fit_job
from lora_jax.trainable import Method, label_words_as_inputs, make_model_fn

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "Method",
    "Readout",
    "TrainConfig",
    "TrainState",
    "capabilities",
    "checkpoint",
    "fit",
    "fit_job",
    "from_pretrained",
    "label_words_as_inputs",
    "lora",
    "losses",
    "make_model_fn",
    "make_output_fn",
    "members",
    "models",
    "optim",
    "packing",
    "params",
    "programs",
    "split",
    "readout",
    "rows",
    "tasks",
    "train",
    "trainable",
]
