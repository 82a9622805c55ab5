"""PEFT file format: `adapter_config.json` + `adapter_model.safetensors`, both directions.

Key names and layouts are PEFT's (`peft.utils.save_and_load.get_peft_model_state_dict`, adapter
name stripped), with the base model under `base_model.model.`:

  ours (module path P)                     PEFT tensor
  P: lora_a (in, r)                        base_model.model.P.lora_A.weight (r, in)  = lora_a.T
  P: lora_b (r, out)                       base_model.model.P.lora_B.weight (out, r) = lora_b.T
  P: bias of a LoRA-targeted Linear        base_model.model.P.base_layer.bias
  P: bias of another module                base_model.model.P.bias
  P in modules_to_save: kernel (in, out)   base_model.model.P.weight (out, in) = kernel.T
                        scale / embedding  base_model.model.P.weight
                        bias               base_model.model.P.bias

HF ties an MLM head's `decoder.bias` to the head's `bias`; PEFT (bias="all") saves both, so
`save_peft` writes the alias too and `load_peft` drops it.

`save_peft` writes `target_modules` as the explicit list of adapted module paths, so PEFT adapts
exactly those modules. `load_peft` keeps PEFT's `target_modules` as `LoraConfig.targets`, which
`apply` re-resolves against the base params (and checks against the loaded tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open
from safetensors.flax import save_file

from lora_jax.errors import ConfigError, InputFileError
from lora_jax.lora.config import LoraBias, LoraConfig, LoraInit

__all__ = [
    "from_peft_config",
    "load_peft",
    "save_peft",
    "to_peft_config",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# MLM heads whose `decoder.bias` HF ties to `<head>.bias` (RoBERTa / BERT).
TIED_DECODER_BIAS = ("lm_head", "cls.predictions")

# PEFT config fields that change the forward pass in ways this package does not implement.
# name -> predicate on the value that says "this feature is in use".
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "use_dora": bool,
    "fan_in_fan_out": bool,
    "lora_bias": bool,
    "use_qalora": bool,
    "megatron_config": lambda v: v is not None,
    "target_parameters": bool,
    "layer_replication": bool,
    "trainable_token_indices": lambda v: v is not None,
    "alora_invocation_tokens": lambda v: v is not None,
    "use_bdlora": lambda v: v is not None,
    "arrow_config": lambda v: v is not None,
    "kasa_config": lambda v: v is not None,
    "monteclora_config": lambda v: v is not None,
    "velora_config": lambda v: v is not None,
}
# init_lora_weights values whose saved adapters are relative to a modified base model.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "mica", "lora_ga")


def to_peft_config(
    cfg: LoraConfig,
    module_paths: list[str],
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The PEFT `adapter_config.json` dict for `cfg`, with explicit `target_modules`.

    Args:
      cfg: our configuration.
      module_paths: dotted paths of the adapted Linears (written as `target_modules`).
      task_type: PEFT task type (e.g. "SEQ_CLS", "TOKEN_CLS"), or None.
      base_model_name_or_path: recorded for PEFT's `PeftModel.from_pretrained` convenience.
    """

    def num(x: float) -> int | float:
        return int(x) if float(x).is_integer() else float(x)

    return {
        "alpha_pattern": {k: num(v) for k, v in cfg.alpha_pattern},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": cfg.bias.value,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True if cfg.init is LoraInit.KAIMING_UNIFORM else cfg.init.value,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": num(cfg.alpha),
        "lora_bias": False,
        "lora_dropout": cfg.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": list(cfg.modules_to_save) or None,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": dict(cfg.rank_pattern),
        "revision": None,
        "target_modules": sorted(module_paths),
        "target_parameters": None,
        "task_type": task_type,
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": cfg.use_rslora,
    }


def from_peft_config(d: Mapping[str, Any]) -> LoraConfig:
    """Our `LoraConfig` for a PEFT LoRA `adapter_config.json` dict.

    `lora_dropout` maps to `dropout` (used only in training); `init_lora_weights` only
    records how the file's weights started, and maps to `init` when it is True/False/"gaussian".

    Raises:
      ValueError: not a LoRA config, or it uses a feature this package does not implement (each
        is named), e.g. DoRA, fan_in_fan_out, megatron, target_parameters, lora_bias,
        layer_replication, an init that rewrote the base weights (PiSSA, OLoRA, LoftQ, ...),
        `layers_pattern`, or the "all-linear" shorthand.
    """
    if d.get("peft_type") != "LORA":
        raise ConfigError(
            f"adapter_config.json has peft_type={d.get('peft_type')!r}; only 'LORA' is supported."
        )
    used = [k for k, pred in _UNSUPPORTED.items() if pred(d.get(k))]
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        used.append(f"init_lora_weights={init!r} (adapter relative to a modified base model)")
    if d.get("layers_pattern") and d.get("layers_to_transform") is not None:
        used.append("layers_pattern (only PEFT's default layer-index rule is implemented)")
    targets = d.get("target_modules")
    if targets == "all-linear":
        used.append("target_modules='all-linear' (list the module names instead)")
    if targets is None:
        used.append("target_modules=None")
    if used:
        raise ConfigError(
            f"This PEFT LoRA config uses features lora_jax does not implement: {used}. "
            "Fix: re-export the adapter from PEFT without them (e.g. merge DoRA, convert PiSSA "
            "with path_initial_model_for_weight_conversion)."
        )
    if isinstance(init, str) and init.lower() == "gaussian":
        our_init = LoraInit.GAUSSIAN
    else:
        our_init = LoraInit.KAIMING_UNIFORM
    layers = d.get("layers_to_transform")
    mts = d.get("modules_to_save") or ()
    return LoraConfig(
        r=int(d.get("r", 8)),
        alpha=float(d.get("lora_alpha", 8)),
        targets=targets if isinstance(targets, str) else tuple(targets),
        exclude=d.get("exclude_modules") or None,
        layers=None if layers is None else layers,
        rank_pattern=tuple((d.get("rank_pattern") or {}).items()),
        alpha_pattern=tuple((d.get("alpha_pattern") or {}).items()),
        use_rslora=bool(d.get("use_rslora", False)),
        init=our_init,
        bias=LoraBias(d.get("bias", "none")),
        modules_to_save=tuple(dict.fromkeys(mts)),
        dropout=float(d.get("lora_dropout") or 0.0),
    )


def peft_state_dict(adapters: Mapping) -> dict[str, jax.Array]:
    """Our adapters as PEFT's adapter state dict (keys and layouts as in the module docstring)."""
    out: dict[str, jax.Array] = {}
    for path, leaves in adapters.items():
        p = PREFIX + path
        is_lora = "lora_a" in leaves
        for leaf, x in leaves.items():
            x = jnp.asarray(x)
            if leaf == "lora_a":
                out[f"{p}.lora_A.weight"] = x.T
            elif leaf == "lora_b":
                out[f"{p}.lora_B.weight"] = x.T
            elif leaf == "bias":
                out[f"{p}.base_layer.bias" if is_lora else f"{p}.bias"] = x
                if path in TIED_DECODER_BIAS:
                    out[f"{p}.decoder.bias"] = x
            elif leaf == "kernel":
                out[f"{p}.weight"] = x.T
            elif leaf in ("scale", "embedding"):
                out[f"{p}.weight"] = x
            else:
                raise ConfigError(
                    f"adapters[{path!r}] has leaf {leaf!r}, which has no PEFT name (expected "
                    "lora_a, lora_b, bias, kernel, scale or embedding)."
                )
    return out


def save_peft(
    directory: str | os.PathLike,
    adapters: Mapping,
    cfg: LoraConfig,
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes a PEFT adapter directory that `PeftModel.from_pretrained(base, directory)` loads.

    Args:
      directory: created if missing; gets `adapter_config.json` and `adapter_model.safetensors`.
      adapters: `{module path: {leaf: array}}` (from `init`, training, `load`, ...).
      cfg: their configuration.
      task_type: PEFT task type, e.g. "SEQ_CLS" (PEFT then also treats `classifier`/`score` as
        modules_to_save), or None.
      base_model_name_or_path: optional base model id/path recorded in the config.

    Raises:
      ValueError: `cfg.init` is PISSA (those adapters are relative to the residual base; convert
        them first, see `init_pissa`), or an adapter leaf has no PEFT name.
    """
    if cfg.init is LoraInit.PISSA:
        raise ConfigError(
            "PiSSA adapters only work on the residual base. Fix: convert them with "
            "adapters, cfg = lora.combine({'t': (trained, cfg), 'i': (initial, cfg)}, "
            "{'t': 1.0, 'i': -1.0}) and save that (exact, rank 2r; see lora.init_pissa)."
        )
    os.makedirs(directory, exist_ok=True)
    paths = [p for p, leaves in adapters.items() if "lora_a" in leaves]
    config = to_peft_config(
        cfg, paths, task_type=task_type, base_model_name_or_path=base_model_name_or_path
    )
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = peft_state_dict(adapters)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def load_peft(
    directory: str | os.PathLike, *, dtype: jnp.dtype | None = None
) -> tuple[dict[str, dict[str, jax.Array]], LoraConfig]:
    """Reads a PEFT LoRA adapter directory.

    Args:
      directory: holds `adapter_config.json` and `adapter_model.safetensors`.
      dtype: cast every tensor to this dtype (default: keep the file's dtype).

    Returns:
      (adapters, cfg): adapters keyed by the full module paths found in the file; cfg's `targets`
      are PEFT's `target_modules`, re-resolved against the base params by `apply`, which also
      checks that the two agree.

    Raises:
      ValueError: unsupported PEFT features (see `from_peft_config`), or tensors this package
        cannot map (embedding LoRA, DoRA magnitudes, ...), each named.
    """
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        cfg = from_peft_config(json.load(f))
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise InputFileError(
            f"{weights} not found; only safetensors adapter files are supported (re-save with "
            "PEFT's save_pretrained(safe_serialization=True))."
        )
    tensors: dict[str, jax.Array] = {}
    with safe_open(weights, framework="flax") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    adapters: dict[str, dict[str, jax.Array]] = {}
    bad: list[str] = []

    def put(path: str, leaf: str, x: jax.Array) -> None:
        adapters.setdefault(path, {})[leaf] = jnp.asarray(x, dtype=dtype)

    for key, x in tensors.items():
        name = key.removeprefix(PREFIX).replace(".modules_to_save.", ".")
        path, _, param = name.rpartition(".")
        if param == "weight" and path.endswith((".lora_A", ".lora_B")):
            module, _, ab = path.rpartition(".")
            put(module, "lora_a" if ab == "lora_A" else "lora_b", x.T)
        elif param == "bias" and path.endswith(".base_layer"):
            put(path.removesuffix(".base_layer"), "bias", x)
        elif (
            param == "bias"
            and path.endswith(".decoder")
            and (PREFIX + path.removesuffix(".decoder") + ".bias" in tensors)
        ):
            continue  # HF-tied alias of `<head>.bias`
        elif "lora_" in name or "base_layer" in name:
            bad.append(key)
        elif param == "bias":
            put(path, "bias", x)
        elif param == "weight" and x.ndim == 2:
            leaf = "embedding" if path.endswith("embeddings") else "kernel"
            put(path, leaf, x if leaf == "embedding" else x.T)
        elif param == "weight" and x.ndim == 1:
            put(path, "scale", x)
        else:
            bad.append(key)
    if bad:
        raise InputFileError(
            f"{weights} holds tensors lora_jax cannot map: {bad[:6]} (supported: lora_A/lora_B of "
            "Linear modules, biases, and modules_to_save Linear/LayerNorm/Embedding weights)."
        )
    return adapters, cfg
