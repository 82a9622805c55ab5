"""LoRA members of different ranks and scales stacked as one adapter pytree.

The members of a training job (:func:`lora_jax.train.fit_job`) share one adapter shape: each
module's rank is padded to the largest any member has, and a per-member factor (rank mask
times the member's scale over the padded config's scale) multiplies ``lora_a`` inside the model
(:func:`with_member_factors`). Padded columns of ``A`` and rows of ``B`` then get exactly zero
gradients and stay exactly zero under AdamW and SGD, so each member trains as it would alone.

Example (ranks 1 and 12 on one encoder)::

    plan = lora.plan_stack(params, [LoraConfig(r=1, alpha=2), LoraConfig(r=12, alpha=24)])
    adapters = lora.init_stack(params, plan, seeds=[13, 21])          # leaves (2, ...)
    fn = make_model_fn(output_fn, "lora", lora_config=plan.config, fusion="fused")
    fn = lora.with_member_factors(fn)            # frozen is (base, plan.factors)
    best = [lora.unpad(plan, results[i].best_trainable, i) for i in range(2)]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import members
from lora_jax.capabilities import Declared, capabilities_of
from lora_jax.errors import ConfigError
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.core import Adapters, init
from lora_jax.lora.targets import resolve


class StackPlan(NamedTuple):
    """LoRA members padded to one shape.

    Attributes:
      configs: each member's own ``LoraConfig``.
      config: the config the stacked adapters fit: per module the largest rank of any member,
        and the scale of member 0 (``configs[0]`` itself when all members agree).
      factors: module path -> ``[n, r_pad]``: member i's rank mask (1 for its first ``r_i``
        columns, 0 after) times its scale over ``config`` 's scale; it multiplies ``lora_a`` in
        :func:`with_member_factors`. None when every member has ``config`` 's ranks and scales
        (nothing to pad or rescale).
      ranks: per member, module path -> its rank ``r_i``.
    """

    configs: tuple[LoraConfig, ...]
    config: LoraConfig
    factors: dict[str, jax.Array] | None
    ranks: tuple[dict[str, int], ...]


def _structure(cfg: LoraConfig) -> LoraConfig:
    """The config without what may differ between members (rank, alpha, scaling rule)."""
    return dataclasses.replace(
        cfg, r=1, alpha=1.0, rank_pattern=(), alpha_pattern=(), use_rslora=False
    )


def plan_stack(params: Mapping, configs: Sequence[LoraConfig]) -> StackPlan:
    """Pads members' LoRA configs to one adapter shape (see :class:`StackPlan`).

    Members may differ in ``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern`` and
    ``use_rslora``; everything else (targets, bias, modules_to_save, init, dropout) must agree.

    Raises:
      ConfigError: no configs, or configs that differ in anything else.
    """
    configs = tuple(configs)
    if not configs:
        raise ConfigError("plan_stack needs at least one LoraConfig (one per member).")
    for i, cfg in enumerate(configs[1:], 1):
        if _structure(cfg) != _structure(configs[0]):
            fields = [
                f.name
                for f in dataclasses.fields(cfg)
                if getattr(_structure(cfg), f.name) != getattr(_structure(configs[0]), f.name)
            ]
            raise ConfigError(
                f"LoRA members of one job must differ only in r, alpha, rank_pattern, "
                f"alpha_pattern and use_rslora; member {i} differs from member 0 in {fields}. "
                "Fix: run those members in separate jobs."
            )
    plans = [resolve(params, cfg).lora for cfg in configs]
    ranks = tuple({p: t.r for p, t in plan.items()} for plan in plans)
    if all(
        {p: (t.r, t.scale) for p, t in plan.items()}
        == {p: (t.r, t.scale) for p, t in plans[0].items()}
        for plan in plans
    ):
        return StackPlan(configs, configs[0], None, ranks)
    r_pad = {p: max(plan[p].r for plan in plans) for p in plans[0]}
    scale0 = {p: t.scale for p, t in plans[0].items()}
    padded = dataclasses.replace(
        configs[0],
        r=max(r_pad.values()),
        alpha=1.0,
        use_rslora=False,
        rank_pattern=tuple((re.escape(p), r) for p, r in r_pad.items()),
        alpha_pattern=tuple((re.escape(p), scale0[p] * r) for p, r in r_pad.items()),
    )
    pad_plan = resolve(params, padded).lora
    factors = {
        p: jnp.asarray(
            [
                (np.arange(r_pad[p]) < plan[p].r) * (plan[p].scale / pad_plan[p].scale)
                for plan in plans
            ],
            jnp.float32,
        )
        for p in r_pad
    }
    return StackPlan(configs, padded, factors, ranks)


def init_stack(params: Mapping, plan: StackPlan, seeds: Sequence[int]) -> Adapters:
    """Stacked adapters: member i is ``lora.init(jax.random.key(seeds[i]), params, configs[i])``,
    zero-padded to the plan's ranks. Leaves ``[n, ...]``."""
    if len(seeds) != len(plan.configs):
        raise ConfigError(f"init_stack got {len(seeds)} seeds for {len(plan.configs)} members.")
    stacked = []
    for seed, cfg in zip(seeds, plan.configs, strict=True):
        adapters = init(jax.random.key(seed), params, cfg)
        for path, leaves in adapters.items():
            if "lora_a" in leaves and plan.factors is not None:
                r = plan.factors[path].shape[1]
                a, b = leaves["lora_a"], leaves["lora_b"]
                leaves["lora_a"] = jnp.pad(a, ((0, 0), (0, r - a.shape[1])))  # (in, r_pad)
                leaves["lora_b"] = jnp.pad(b, ((0, r - b.shape[0]), (0, 0)))  # (r_pad, out)
        stacked.append(adapters)
    return members.stack(stacked)


def unpad(plan: StackPlan, adapters: Adapters, i: int) -> Adapters:
    """Member ``i`` 's adapters (one member's, e.g. ``FitResult.best_trainable``) cut to its own
    ranks, so that they fit ``plan.configs[i]`` (for ``lora.apply``, saving, PEFT export)."""
    out = dict(adapters)
    for path, r in plan.ranks[i].items():
        out[path] = dict(
            out[path], lora_a=out[path]["lora_a"][:, :r], lora_b=out[path]["lora_b"][:r]
        )
    return out


def with_member_factors(model_fn: Callable) -> Declared:
    """Wraps a ``model_fn`` over adapters of ``plan.config`` for padded LoRA members.

    Returns ``fn(adapters, (base, factors), batch, dropout_rng)`` that multiplies each
    ``lora_a`` (in, r_pad) by the member's factor [r_pad] (one member's row of
    ``StackPlan.factors``) and calls ``model_fn(adapters, base, batch, dropout_rng)``.
    ``model_fn`` may be any model over the padded config: the fused LoRA model of
    ``trainable.make_model_fn(..., fusion="fused")`` (which shares the base GEMMs across members)
    or ntk's linearized LoRA model. It keeps ``model_fn`` 's capabilities, and passes a
    ``label_word_ids=`` keyword on (``trainable.label_words_as_inputs``).
    """

    def fn(adapters, frozen, batch, dropout_rng, **words):
        base, factors = frozen
        folded = {
            path: dict(
                leaves, lora_a=leaves["lora_a"] * factors[path].astype(leaves["lora_a"].dtype)
            )
            if "lora_a" in leaves
            else leaves
            for path, leaves in adapters.items()
        }
        return model_fn(folded, base, batch, dropout_rng, **words)

    return Declared(fn, capabilities_of(model_fn))
