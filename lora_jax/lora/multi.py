"""Several named adapters on one base: a plain dict `{name: (adapters, cfg)}`.

There is no adapter-set object: adding an adapter is `named["b"] = (adapters_b, cfg_b)`,
switching is `apply_named(params, named, "b")`, merging one in is `merge_named(params, named,
"a")` (a new base), and `combine` builds a new (adapters, cfg) from a weighted set, like PEFT's
`add_weighted_adapter`:

* `"cat"` (exact): concatenates the ranks. On each module the new factors are
  A = [w_1 s_1 A_1, ..., w_k s_k A_k] (in, sum r_i) and B = [B_1; ...; B_k] (sum r_i, out) with
  scale 1, so A @ B = sum_i w_i s_i A_i @ B_i: exactly the weighted sum of the adapters' deltas.
  Modules adapted by only some adapters get the concatenation of those.
* `"linear"` (approximate, PEFT's "linear"): needs equal ranks per module; A = sum_i
  sign(w_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i, scale 1. A @ B then contains cross
  terms A_i @ B_j, so it equals the weighted sum only for one adapter (or orthogonal ones); PEFT
  documents it as "a very rough approximation".

The combined config targets the explicit module paths, with `rank_pattern` / `alpha_pattern`
entries per module so that every module's scale is 1; it exports to PEFT with `save_peft`.
Only LoRA factors combine: adapters with trainable biases or `modules_to_save` copies raise
(PEFT raises for the same reason: which copy would win is ambiguous).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from lora_jax.errors import ConfigError
from lora_jax.lora.config import Fusion, LoraConfig
from lora_jax.lora.core import Adapters, apply, merge

__all__ = ["apply_named", "combine", "merge_named"]

Named = Mapping[str, tuple[Adapters, LoraConfig]]


def _get(named: Named, name: str) -> tuple[Adapters, LoraConfig]:
    if name not in named:
        raise ConfigError(f"No adapter named {name!r}; available: {sorted(named)}.")
    return named[name]


def _scales(adapters: Adapters, cfg: LoraConfig) -> dict[str, float]:
    """Scale per LoRA module, from cfg patterns and the adapters' own ranks."""
    out = {}
    for path, leaves in adapters.items():
        if set(leaves) != {"lora_a", "lora_b"}:
            raise ConfigError(
                f"combine only handles LoRA factors, but adapters[{path!r}] holds "
                f"{sorted(leaves)} (a trainable bias or modules_to_save copy). Fix: merge that "
                "adapter into the base with merge_named, or train without bias/modules_to_save."
            )
        r = int(leaves["lora_a"].shape[-1])
        out[path] = cfg.scale_for(r, cfg.alpha_for(path))
    return out


def combine(
    named: Named, weights: Mapping[str, float], *, method: str = "cat"
) -> tuple[Adapters, LoraConfig]:
    """Weighted combination of named adapters into one (adapters, cfg).

    Args:
      named: `{name: (adapters, cfg)}`.
      weights: `{name: weight}` of the adapters to combine (negative weights subtract).
      method: "cat" (exact, rank = sum of ranks) or "linear" (approximate, equal ranks).

    Returns:
      (adapters, cfg) with scale 1 on every module; apply it with `apply` on the same base.

    Raises:
      ValueError: unknown names or method, unequal ranks for "linear", adapters holding biases or
        modules_to_save copies, or a concatenated rank above min(in, out) of a kernel.
    """
    if method not in ("cat", "linear"):
        raise ConfigError(f"combine method={method!r}; expected 'cat' or 'linear'.")
    if not weights:
        raise ConfigError("combine needs at least one {name: weight} entry.")
    parts = []
    for name, w in weights.items():
        adapters, cfg = _get(named, name)
        parts.append((adapters, _scales(adapters, cfg), float(w)))
    paths = list(dict.fromkeys(p for adapters, _, _ in parts for p in adapters))
    out: Adapters = {}
    for path in paths:
        here = [(a[path], s[path], w) for a, s, w in parts if path in a]
        if method == "cat":
            a = jnp.concatenate([ad["lora_a"] * (w * s) for ad, s, w in here], axis=-1)
            b = jnp.concatenate([ad["lora_b"] for ad, _, _ in here], axis=0)
        else:
            ranks = {int(ad["lora_a"].shape[-1]) for ad, _, _ in here}
            if len(ranks) != 1:
                raise ConfigError(
                    f"combine(method='linear') needs equal ranks per module; {path!r} has ranks "
                    f"{sorted(ranks)}. Fix: use method='cat' (exact)."
                )
            ws = [
                (math.copysign(math.sqrt(abs(w * s)), w * s), math.sqrt(abs(w * s)))
                for _, s, w in here
            ]
            a = sum(wa * ad["lora_a"] for (ad, _, _), (wa, _) in zip(here, ws, strict=True))
            b = sum(wb * ad["lora_b"] for (ad, _, _), (_, wb) in zip(here, ws, strict=True))
        out[path] = {"lora_a": a, "lora_b": b}
    return out, _unit_scale_config({p: int(d["lora_a"].shape[-1]) for p, d in out.items()})


def _unit_scale_config(ranks: dict[str, int]) -> LoraConfig:
    """Config targeting exactly `ranks`' paths, rank per path, scale alpha / r = 1 everywhere."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = tuple((re.escape(p), rp) for p, rp in ranks.items() if rp != r)
    return LoraConfig(
        r=r,
        alpha=float(r),
        targets=tuple(ranks),
        rank_pattern=pattern,
        alpha_pattern=tuple((k, float(v)) for k, v in pattern),
    )


def apply_named(
    params: Mapping,
    named: Named,
    active: str | Sequence[str],
    *,
    fusion: Fusion | str = Fusion.MERGED,
) -> dict:
    """Params with the named adapter(s) active.

    Args:
      params: base params.
      named: `{name: (adapters, cfg)}`.
      active: one name, or several whose deltas add up (PEFT's multiple active adapters; done
        exactly through `combine(..., method="cat")` with unit weights).
      fusion: as in `apply`.
    """
    if isinstance(active, str):
        adapters, cfg = _get(named, active)
        return apply(params, adapters, cfg, fusion=fusion)
    adapters, cfg = combine(named, dict.fromkeys(active, 1.0), method="cat")
    return apply(params, adapters, cfg, fusion=fusion)


def merge_named(params: Mapping, named: Named, name: str) -> dict:
    """Merges the adapter `name` into `params` (a new base; the others then apply on top)."""
    adapters, cfg = _get(named, name)
    return merge(params, adapters, cfg)
