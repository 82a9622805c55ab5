"""`LoraConfig`: what to adapt, at which rank and scale, and how to initialize.

Field meanings follow PEFT's `LoraConfig` (`r`, `lora_alpha` -> `alpha`, `target_modules` ->
`targets`, `exclude_modules` -> `exclude`, `layers_to_transform` -> `layers`, `rank_pattern`,
`alpha_pattern`, `lora_dropout` -> `dropout`, `use_rslora`, `bias`, `modules_to_save`,
`init_lora_weights` -> `init`), so a
PEFT config ports field by field (`lora_jax.lora.from_peft_config` does it for you).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lora_jax.errors import ConfigError

__all__ = ["LoraBias", "LoraConfig", "LoraInit"]


class LoraInit(enum.StrEnum):
    """How `init` draws the adapter factors A (in, r) and B (r, out).

    Members:
      KAIMING_UNIFORM: PEFT's default (`init_lora_weights=True`): A as torch's `nn.Linear`
        default init of the (r, in) `lora_A` weight, i.e. kaiming-uniform with a = sqrt(5),
        which is U(-1/sqrt(in), 1/sqrt(in)); B = 0. The adapted model starts equal to the base.
        Safe default.
      GAUSSIAN: PEFT's `"gaussian"`: A ~ N(0, (1/r)^2) (std 1/r), B = 0. Starts equal to the base.
      PISSA: PiSSA (Meng et al., arXiv:2404.02948, 2024), PEFT's `"pissa"`: A, B from the top-r
        singular triplets of W, scaled so that scale * A @ B is the rank-r truncation of W, and the
        base kernel replaced by the residual W - scale * A @ B. Because the base changes, use
        `init_pissa(params, cfg) -> (residual_params, adapters)` instead of `init`. Faster early
        progress; the adapter is only meaningful on the residual base (convert it to a plain
        adapter with `combine(..., method="cat")`, see `lora_jax.lora.multi`).
    """

    KAIMING_UNIFORM = "kaiming_uniform"
    GAUSSIAN = "gaussian"
    PISSA = "pissa"


class Fusion(enum.StrEnum):
    """How `apply` computes a LoRA module: the merged kernel or the fused low-rank branch.

    Members:
      MERGED: the kernel becomes W + scale * A @ B (materialized); the params keep their plain
        structure, so any model's `apply_fn` runs them. The default of `lora.apply`, for that
        reason; for inference, `merge` once and run the plain params.
      FUSED: the Linear dict gets `lora_a`, `lora_b`, `lora_scale`, and this library's `dense`
        computes x @ W + scale * (x @ A) @ B: no (in, out) weight gradient per step, and the
        base GEMM shared by the members of a job (`lora.with_member_factors`).
      AUTO: per module, FUSED where that is cheaper for a training step, i.e. where
        3 r (in + out) < in * out (r well below the layer width), MERGED elsewhere. The default
        of `trainable.make_model_fn`, which builds training models of this library's encoders.
    All three compute the same function (to float rounding).
    """

    MERGED = "merged"
    FUSED = "fused"
    AUTO = "auto"


class LoraBias(enum.StrEnum):
    """Which biases train alongside the LoRA factors (PEFT's `bias`).

    Members:
      NONE: no bias trains (default).
      ALL: every leaf named `bias` in the model trains (Linear and LayerNorm biases, the MLM
        head's output bias), as PEFT's `bias="all"` does.
      LORA_ONLY: only the biases of the LoRA-targeted Linear modules train.
    """

    NONE = "none"
    ALL = "all"
    LORA_ONLY = "lora_only"


Targets = str | tuple[str, ...]


def _pairs(name: str, value: object, cast: type) -> tuple[tuple[str, int | float], ...]:
    """Normalizes a pattern mapping into an ordered, hashable tuple of (regex, value) pairs."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((str(k), cast(v)) for k, v in items)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"LoraConfig.{name} must map module-path regexes to {cast.__name__} values, got "
            f"{value!r}. Fix: pass e.g. {{'value': 16}}."
        ) from err
    for k, v in pairs:
        try:
            re.compile(k)
        except re.error as err:
            raise ConfigError(f"LoraConfig.{name} key {k!r} is not a valid regex: {err}") from err
        if v <= 0:
            raise ConfigError(f"LoraConfig.{name}[{k!r}] = {v!r}; expected a positive value (> 0).")
    return pairs


def _names(name: str, value: object, *, allow_str: bool) -> Targets | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            return (value,)
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"LoraConfig.{name} = {value!r} is not a valid regex: {err}") from err
        return value
    if isinstance(value, Sequence | set | frozenset):
        out = tuple(sorted(value)) if isinstance(value, set | frozenset) else tuple(value)
        if not all(isinstance(v, str) and v for v in out):
            raise ConfigError(
                f"LoraConfig.{name} must be a regex string or a list of module names, got "
                f"{value!r}."
            )
        return out
    raise ConfigError(
        f"LoraConfig.{name} must be a regex string or a list of module names, got "
        f"{type(value).__name__} {value!r}."
    )


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Configuration of a LoRA adapter: W' = W + scale * A @ B on each targeted Linear.

    A targeted Linear with kernel W (in, out) gets A (in, r) and B (r, out); the forward pass sees
    `x @ (W + scale * A @ B)` with `scale = alpha / r` (or `alpha / sqrt(r)` with `use_rslora`).

    Targeting (which Linear modules get A and B) follows PEFT's `check_target_module_exists`, on the
    dotted module path of each Linear (e.g. `roberta.encoder.layer.0.attention.self.query`):

    * `exclude` is checked first (same rules as `targets`); modules inside `modules_to_save` are
      never targeted (as in PEFT).
    * `targets` as a list/tuple of names: a module matches when its path equals a name or ends with
      `"." + name` (so `("query", "value")` or `("attention.self.query",)`).
    * `targets` as a string: a regex. It matches when it `re.fullmatch`es the full module path OR
      any dotted suffix of it, so `"query|value"` works as written, and every PEFT regex (which
      must fullmatch the full path) matches the same modules here.
    * `layers` (PEFT's `layers_to_transform`) keeps only modules whose layer index (the first
      integer path segment that follows at least two segments, PEFT's default `layers_pattern`,
      e.g. the `0` in `roberta.encoder.layer.0...`) is in `layers`. Unlike PEFT, this also works
      with a regex `targets`.
    * Only Linear modules (a dict with a 2-D `kernel`) can be targeted; a target that matches
      another kind of module (an embedding, a LayerNorm, a block) or nothing at all is an error.

    Attributes:
      r: default rank (PEFT `r`). Must be > 0 and <= min(in, out) of every targeted kernel.
      alpha: scaling numerator (PEFT `lora_alpha`). Must be > 0.
      targets: module names or a regex; default `("query", "value")`, PEFT's default for
        BERT/RoBERTa.
      exclude: module names or a regex never targeted (PEFT `exclude_modules`).
      layers: layer indices to adapt (PEFT `layers_to_transform`); None means all layers.
      rank_pattern: ordered `{regex: r}` overrides (PEFT `rank_pattern`): the first key with
        `re.match(rf"(.*\\.)?({key})$", path)` sets the rank of that module. Stored as a tuple of
        pairs so the config stays hashable.
      alpha_pattern: ordered `{regex: alpha}` overrides, same matching (PEFT `alpha_pattern`).
      use_rslora: rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski, arXiv:2312.03732, 2023).
      init: a `LoraInit` (or its string value).
      bias: a `LoraBias` (or its string value): which biases train in the adapters pytree.
      modules_to_save: module names (exact path or `.name` suffix) whose leaves are copied into
        the adapters pytree and train in full, e.g. `("classifier",)` for a fresh head.

      dropout: PEFT's `lora_dropout`: inverted dropout on the input of the LoRA branch only,
        `x W + scale * dropout(x) A B`, with an independent mask per module. It runs only when
        `apply` gets a `dropout_rng` (in `lora_jax.train`, when `TrainConfig.train_dropout` is
        on, as PEFT's runs only in `model.train()`); modules with dropout then use the fused
        path, since the merged weight cannot express it. Must be in [0, 1).

    Example:
      >>> cfg = LoraConfig(r=4, alpha=8, targets="query|value")
      >>> cfg.scale_for(4, 8.0)
      2.0
    """

    r: int = 8
    alpha: float = 8.0
    targets: Targets = ("query", "value")
    exclude: Targets | None = None
    layers: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = field(default=())
    alpha_pattern: tuple[tuple[str, float], ...] = field(default=())
    use_rslora: bool = False
    init: LoraInit = LoraInit.KAIMING_UNIFORM
    bias: LoraBias = LoraBias.NONE
    modules_to_save: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self):
        set_ = object.__setattr__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(
                f"LoraConfig.r = {self.r!r}; expected a positive integer rank, e.g. r=8."
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ConfigError(f"LoraConfig.alpha = {self.alpha!r}; expected a positive number.")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(
                f"LoraConfig.alpha = {self.alpha!r}; expected a positive number, e.g. alpha=16."
            )
        set_(self, "alpha", float(self.alpha))
        targets = _names("targets", self.targets, allow_str=True)
        if targets is None or len(targets) == 0:
            raise ConfigError(
                f"LoraConfig.targets = {self.targets!r}; expected module names such as "
                "('query', 'value') or a regex such as 'query|value'."
            )
        set_(self, "targets", targets)
        set_(self, "exclude", _names("exclude", self.exclude, allow_str=True) or None)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise ConfigError(
                    f"LoraConfig.layers = {self.layers!r}; expected None or non-negative layer "
                    "indices, e.g. layers=(0, 1)."
                )
            set_(self, "layers", layers)
        set_(self, "rank_pattern", _pairs("rank_pattern", self.rank_pattern, int))
        set_(self, "alpha_pattern", _pairs("alpha_pattern", self.alpha_pattern, float))
        for k, v in self.rank_pattern:
            if int(v) != v:
                raise ConfigError(f"LoraConfig.rank_pattern[{k!r}] = {v!r}; expected an integer.")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(
                f"LoraConfig.use_rslora = {self.use_rslora!r}; expected True or False."
            )
        for name, enum_cls in (("init", LoraInit), ("bias", LoraBias)):
            value = getattr(self, name)
            try:
                set_(self, name, enum_cls(value))
            except ValueError as err:
                allowed = [m.value for m in enum_cls]
                raise ConfigError(
                    f"LoraConfig.{name} = {value!r}; expected one of {allowed}."
                ) from err
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(
                f"LoraConfig.dropout = {self.dropout!r}; expected a rate in [0, 1), e.g. 0.05."
            )
        set_(self, "dropout", float(self.dropout))
        mts = _names("modules_to_save", self.modules_to_save, allow_str=False) or ()
        set_(self, "modules_to_save", mts)

    def rank_for(self, path: str) -> int:
        """Rank of the module at dotted `path` (PEFT `get_pattern_key` on `rank_pattern`)."""
        return int(_pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """Alpha of the module at dotted `path` (PEFT `get_pattern_key` on `alpha_pattern`)."""
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_for(self, r: int, alpha: float) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: tuple[tuple[str, float], ...], path: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first key with `re.match(rf"(.*\\.)?({key})$", path)` wins."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
