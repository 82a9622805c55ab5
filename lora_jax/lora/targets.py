"""Which modules of a parameter pytree a `LoraConfig` touches (PEFT's targeting rules).

A *module* is a dict node of the params pytree; its dotted *path* joins the keys from the root
(`roberta.encoder.layer.0.attention.self.query`, int keys written as digits). A *Linear* is a
module holding a 2-D `kernel` leaf (in, out). `resolve(params, cfg)` returns a `Plan`: the LoRA
targets with their rank, alpha and scale, the modules whose `bias` trains, and the modules copied
in full (`modules_to_save`). Everything else in this package works from a `Plan`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from lora_jax.errors import ConfigError
from lora_jax.lora.config import LoraBias, LoraConfig

__all__ = [
    "DEFAULT_TARGETS",
    "LoraTarget",
    "default_targets",
    "Plan",
    "iter_modules",
    "layer_index",
    "matches",
    "resolve",
]

Keys = tuple[Any, ...]

# PEFT's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), by HF ``model_type``.
DEFAULT_TARGETS: dict[str, str] = {
    "roberta": "query|value",
    "bert": "query|value",
    "electra": "query|value",
    "deberta-v2": "query_proj|value_proj",
}


def default_targets(model_type: str) -> str:
    """PEFT's default LoRA targets (query and value projections) for an HF ``model_type``."""
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"No default LoRA targets for model_type {model_type!r}; pass targets explicitly "
            f"(known: {sorted(DEFAULT_TARGETS)})."
        )
    return DEFAULT_TARGETS[model_type]


# PEFT's default layer-index regex (tuners_utils.check_target_module_exists, layers_pattern=None).
_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


class LoraTarget(NamedTuple):
    """One targeted Linear: dotted path, kernel shape, rank, alpha and the resulting scale."""

    path: str
    in_features: int
    out_features: int
    r: int
    alpha: float
    scale: float


class Plan(NamedTuple):
    """What a config touches in a given params pytree.

    Attributes:
      lora: path -> `LoraTarget` for every targeted Linear, in params order.
      bias: paths of the modules whose `bias` leaf trains (`LoraConfig.bias`).
      saved: path -> leaf names, for every module (dict with array leaves) inside a
        `modules_to_save` module; those leaves are copied and train in full.
      keys: path -> tuple of pytree keys, for every module of the params.
    """

    lora: dict[str, LoraTarget]
    bias: tuple[str, ...]
    saved: dict[str, tuple[str, ...]]
    keys: dict[str, Keys]

    def leaf_shapes(self, params: Mapping) -> dict[tuple[str, str], tuple[int, ...]]:
        """(module path, leaf name) -> shape of every leaf an adapters pytree must hold."""
        shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        for path, t in self.lora.items():
            shapes[(path, "lora_a")] = (t.in_features, t.r)
            shapes[(path, "lora_b")] = (t.r, t.out_features)
        for path in self.bias:
            shapes[(path, "bias")] = tuple(get_module(params, self.keys[path])["bias"].shape)
        for path, leaves in self.saved.items():
            module = get_module(params, self.keys[path])
            for leaf in leaves:
                shapes[(path, leaf)] = tuple(module[leaf].shape)
        return shapes


def _is_leaf(x: Any) -> bool:
    return not isinstance(x, Mapping)


def iter_modules(params: Mapping, prefix: Keys = ()) -> Iterator[tuple[str, Keys, Mapping]]:
    """Yields (dotted path, keys, module dict) for every dict node, parents before children."""
    for k, v in params.items():
        if isinstance(v, Mapping):
            keys = (*prefix, k)
            yield ".".join(str(s) for s in keys), keys, v
            yield from iter_modules(v, keys)


def get_module(params: Mapping, keys: Keys) -> Mapping:
    node = params
    for k in keys:
        node = node[k]
    return node


def is_linear(module: Mapping) -> bool:
    kernel = module.get("kernel")
    return kernel is not None and _is_leaf(kernel) and getattr(kernel, "ndim", 0) == 2


def layer_index(path: str) -> int | None:
    """PEFT's default layer index of a module path, e.g. 3 for `roberta.encoder.layer.3.output`."""
    m = _LAYER_RE.match(path + ".")  # PEFT matches "<module>." prefixes of parameter names
    return int(m.group("idx")) if m else None


def _match_names(path: str, spec: str | tuple[str, ...]) -> bool:
    if isinstance(spec, str):
        parts = path.split(".")
        return any(re.fullmatch(spec, ".".join(parts[i:])) for i in range(len(parts)))
    return any(path == name or path.endswith("." + name) for name in spec)


def _in_saved(path: str, modules_to_save: tuple[str, ...]) -> bool:
    """PEFT: adapters never go inside a modules_to_save module (`(^|.*\\.)m($|\\..*)`)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules_to_save)


def matches(path: str, cfg: LoraConfig) -> bool:
    """Whether the module at `path` is a LoRA target of `cfg` (module kind not checked)."""
    if cfg.exclude is not None and _match_names(path, cfg.exclude):
        return False
    if _in_saved(path, cfg.modules_to_save):
        return False
    if not _match_names(path, cfg.targets):
        return False
    if cfg.layers is not None:
        idx = layer_index(path)
        return idx is not None and idx in cfg.layers
    return True


def resolve(params: Mapping, cfg: LoraConfig) -> Plan:
    """Resolves `cfg` against `params`.

    Args:
      params: nested dict of arrays (or `jax.ShapeDtypeStruct`s).
      cfg: the LoRA configuration.

    Returns:
      The `Plan` (targets with per-module rank/alpha/scale, trainable biases, saved modules).

    Raises:
      ValueError: no Linear matches `cfg.targets` (the message lists real Linear paths); a target
        matches a module that is not a Linear; a rank exceeds min(in, out) of its kernel; a
        `modules_to_save` list matches no module.
    """
    sig = tuple(
        (path, tuple(m["kernel"].shape) if is_linear(m) else None)
        for path, _, m in iter_modules(params)
    )
    lora, bias, saved_roots = _resolve_cached(sig, cfg)
    keys = {path: k for path, k, _ in iter_modules(params)}
    saved: dict[str, tuple[str, ...]] = {}
    for root in saved_roots:
        for path, k in keys.items():
            if path == root or path.startswith(root + "."):
                leaves = tuple(n for n, v in get_module(params, k).items() if _is_leaf(v))
                if leaves:
                    saved[path] = leaves
    if cfg.bias is not LoraBias.NONE:
        bias = tuple(p for p in bias if "bias" in get_module(params, keys[p]))
    return Plan(lora=dict(lora), bias=bias, saved=saved, keys=keys)


@functools.lru_cache(maxsize=64)
def _resolve_cached(
    sig: tuple[tuple[str, tuple[int, ...] | None], ...], cfg: LoraConfig
) -> tuple[tuple[tuple[str, LoraTarget], ...], tuple[str, ...], tuple[str, ...]]:
    linear = {path: shape for path, shape in sig if shape is not None}
    lora: list[tuple[str, LoraTarget]] = []
    not_linear: list[str] = []
    for path, shape in sig:
        if not matches(path, cfg):
            continue
        if shape is None:
            not_linear.append(path)
            continue
        r, alpha = cfg.rank_for(path), cfg.alpha_for(path)
        n_in, n_out = shape
        if r > min(n_in, n_out):
            raise ConfigError(
                f"LoRA rank r={r} for {path!r} exceeds min(in, out) = min({n_in}, {n_out}) of "
                "its kernel; a rank above that adds parameters but no expressiveness. Fix: lower "
                "LoraConfig.r or add a rank_pattern entry for this module."
            )
        lora.append((path, LoraTarget(path, n_in, n_out, r, alpha, cfg.scale_for(r, alpha))))
    if not_linear:
        raise ConfigError(
            f"LoraConfig.targets={cfg.targets!r} matches modules that are not Linear layers "
            f"(a dict with a 2-D 'kernel'): {not_linear[:8]}. Only Linear modules can carry "
            "LoRA here. Fix: name the Linear modules inside them, or add these to `exclude`."
        )
    if not lora:
        examples = [p for p in linear if not _in_saved(p, cfg.modules_to_save)]
        raise ConfigError(
            f"LoraConfig.targets={cfg.targets!r} (exclude={cfg.exclude!r}, layers={cfg.layers!r}) "
            f"matched no Linear module. Some Linear module paths of these params: "
            f"{_sample(examples)}. Fix: use names (exact or dotted suffix) or a regex matching "
            "these paths."
        )
    saved_roots: list[str] = []
    if cfg.modules_to_save:
        for path, _ in sig:
            if _match_names(path, cfg.modules_to_save) and not any(
                path.startswith(r + ".") for r in saved_roots
            ):
                saved_roots.append(path)
        if not saved_roots:
            raise ConfigError(
                f"LoraConfig.modules_to_save={cfg.modules_to_save!r} matched no module. Top-level "
                f"modules: {sorted({p.split('.')[0] for p, _ in sig})}."
            )
    bias: list[str] = []
    if cfg.bias is LoraBias.LORA_ONLY:
        bias = [path for path, _ in lora]
    elif cfg.bias is LoraBias.ALL:
        bias = [path for path, _ in sig if not _in_saved(path, tuple(saved_roots))]
    return tuple(lora), tuple(bias), tuple(saved_roots)


def _sample(paths: list[str], n: int = 12) -> list[str]:
    """Up to n paths spread over the list (so every layer kind shows up)."""
    if len(paths) <= n:
        return paths
    # Prefer distinct layer-free shapes of the path first: layer 0 and the heads.
    seen, out = set(), []
    for p in paths:
        shape = re.sub(r"\.\d+\.", ".N.", p)
        if shape not in seen:
            seen.add(shape)
            out.append(p)
    return out[:n]
