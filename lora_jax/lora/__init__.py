"""Functional LoRA for parameter pytrees: init, apply, merge, save, PEFT interop.

Example:
  >>> import jax
  >>> from lora_jax import lora
  >>> cfg = lora.LoraConfig(r=8, alpha=16, targets="query|value")
  >>> adapters = lora.init(jax.random.key(0), params, cfg)            # doctest: +SKIP
  >>> logits = apply_fn(lora.apply(params, adapters, cfg), input_ids)  # doctest: +SKIP
"""

from lora_jax.lora.config import Fusion, LoraBias, LoraConfig, LoraInit
from lora_jax.lora.core import (
    Adapters,
    LoraCount,
    apply,
    check_fits,
    count,
    init,
    init_pissa,
    logical_axes,
    merge,
    trainable_mask,
    unmerge,
)
from lora_jax.lora.io import config_from_dict, config_to_dict, load, save
from lora_jax.lora.multi import apply_named, combine, merge_named
from lora_jax.lora.peft import (
    from_peft_config,
    load_peft,
    save_peft,
    to_peft_config,
)
from lora_jax.lora.stack import StackPlan, init_stack, plan_stack, unpad, with_member_factors
from lora_jax.lora.targets import DEFAULT_TARGETS, LoraTarget, Plan, default_targets, resolve

__all__ = [
    "DEFAULT_TARGETS",
    "Adapters",
    "Fusion",
    "LoraBias",
    "LoraConfig",
    "LoraCount",
    "LoraInit",
    "LoraTarget",
    "Plan",
    "StackPlan",
    "apply",
    "apply_named",
    "check_fits",
    "combine",
    "config_from_dict",
    "config_to_dict",
    "count",
    "default_targets",
    "from_peft_config",
    "init",
    "init_pissa",
    "init_stack",
    "load",
    "load_peft",
    "logical_axes",
    "merge",
    "merge_named",
    "plan_stack",
    "resolve",
    "save",
    "save_peft",
    "to_peft_config",
    "trainable_mask",
    "unmerge",
    "unpad",
    "with_member_factors",
]
