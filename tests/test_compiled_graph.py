"""Properties of the compiled LoRA gradient that decide its speed on XLA:CPU.

XLA duplicates chains of cheap elementwise ops into every consumer fusion. When the backward
residual-stream cotangent stayed such a chain across layers (LayerNorm's JVP multiplied by
``1/std``), each layer's fusions recomputed every layer above it: the largest fusion's operand
count grew with depth (15, 42, 98 operands at 2, 4, 8 layers) and a RoBERTa-base LoRA step spent
about 0.6 s of 3.1 s in those fusions. The test pins the fix (see ``layers._layer_norm_jvp``).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp

from lora_jax import lora
from lora_jax.models import create, split


def _largest_fusion_operands(config, layers: int) -> int:
    cfg = dataclasses.replace(
        config,
        num_hidden_layers=layers,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    apply_fn, params = split(create(cfg, head="cls", num_labels=2, seed=0))
    lcfg = lora.LoraConfig(r=2, alpha=4, targets=("query", "value"))
    adapters = lora.init(jax.random.key(0), params, lcfg)
    ids = jnp.full((2, 8), 5, jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32)

    def loss(a):
        return apply_fn(lora.apply(params, a, lcfg, fusion="fused"), ids, mask).sum()

    hlo = jax.jit(jax.grad(loss)).lower(adapters).compile().as_text()
    fusions = re.findall(r"= \S+ fusion\((.*?)\), kind=", hlo)
    assert fusions, "no fusions found in the compiled HLO; the regex no longer matches"
    return max(len(re.findall(r"%[\w.\-]+", operands)) for operands in fusions)


def test_backward_fusions_do_not_grow_with_depth(tiny_encoder_config):
    sizes = [_largest_fusion_operands(tiny_encoder_config, n) for n in (2, 4, 8)]
    assert sizes[2] <= sizes[0] + 4, (
        f"largest fusion has {sizes} operands at 2/4/8 layers: a fusion recomputes the "
        "layers above it (see lora_jax.models.layers._layer_norm_jvp)"
    )
