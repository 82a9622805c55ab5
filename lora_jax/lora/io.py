"""Save / load an adapters pytree alone, as one safetensors file with its config as metadata.

File layout: tensor `"<module path>.<leaf>"` for every adapters leaf (e.g.
`roberta.encoder.layer.0.attention.self.query.lora_a`, shape (in, r)), and the metadata entry
`"lora_config"` holding `config_to_dict(cfg)` as JSON (plus `"format": "lora_jax"`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from safetensors import safe_open
from safetensors.flax import save_file

from lora_jax.errors import ConfigError, InputFileError
from lora_jax.lora.config import LoraConfig

__all__ = ["config_from_dict", "config_to_dict", "load", "save"]

_FORMAT = "lora_jax"


def config_to_dict(cfg: LoraConfig) -> dict[str, Any]:
    """A JSON-ready dict of `cfg` (patterns as ordered objects, enums as their strings)."""
    return {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "targets": cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets),
        "exclude": (
            cfg.exclude
            if cfg.exclude is None or isinstance(cfg.exclude, str)
            else list(cfg.exclude)
        ),
        "layers": None if cfg.layers is None else list(cfg.layers),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_rslora": cfg.use_rslora,
        "init": cfg.init.value,
        "bias": cfg.bias.value,
        "modules_to_save": list(cfg.modules_to_save),
        "dropout": cfg.dropout,
    }


def config_from_dict(d: Mapping[str, Any]) -> LoraConfig:
    """Inverse of `config_to_dict`.

    Raises:
      ValueError: unknown keys (named), or invalid values (from `LoraConfig`).
    """
    known = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"Unknown LoraConfig fields {unknown}; expected a subset of {sorted(known)}."
        )
    kw = dict(d)
    for name in ("rank_pattern", "alpha_pattern"):
        if name in kw and isinstance(kw[name], Mapping):
            kw[name] = tuple(kw[name].items())
    return LoraConfig(**kw)


def save(path: str | os.PathLike, adapters: Mapping, cfg: LoraConfig) -> None:
    """Writes `adapters` and `cfg` to one safetensors file at `path` (parents created).

    Args:
      path: file path, conventionally ending in `.safetensors`.
      adapters: `{module path: {leaf: array}}`.
      cfg: the configuration (stored as JSON metadata).
    """
    tensors = {}
    for module, leaves in adapters.items():
        for leaf, x in leaves.items():
            tensors[f"{module}.{leaf}"] = jax.numpy.asarray(x)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": _FORMAT, "lora_config": json.dumps(config_to_dict(cfg))}
    save_file(tensors, os.fspath(path), metadata=meta)


def load(path: str | os.PathLike) -> tuple[dict[str, dict[str, jax.Array]], LoraConfig]:
    """Reads a file written by `save`.

    Returns:
      (adapters, cfg).

    Raises:
      ValueError: the file has no `lora_config` metadata (e.g. it is a PEFT file: use
        `load_peft` on its directory).
    """
    adapters: dict[str, dict[str, jax.Array]] = {}
    with safe_open(os.fspath(path), framework="flax") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT or "lora_config" not in meta:
            raise InputFileError(
                f"{os.fspath(path)!r} has no lora_jax metadata (got metadata keys "
                f"{sorted(meta)}); expected a file written by lora_jax.lora.save. For a PEFT "
                "adapter directory use lora_jax.lora.load_peft."
            )
        for key in f.keys():
            module, leaf = key.rsplit(".", 1)
            adapters.setdefault(module, {})[leaf] = f.get_tensor(key)
        cfg = config_from_dict(json.loads(meta["lora_config"]))
    return adapters, cfg
