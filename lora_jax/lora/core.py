"""Functional LoRA: pure transforms between a base params pytree and an adapters pytree.

The adapters pytree is a flat dict `{module path: {leaf name: array}}`:

* a LoRA-targeted Linear at `path` holds `lora_a` (in, r) and `lora_b` (r, out) (logical axes
  ('embed', 'lora_rank') and ('lora_rank', 'mlp' or 'embed')), plus `bias` (out,) when that bias
  trains;
* a module whose bias trains (`LoraConfig.bias`) holds `bias`;
* every module inside a `modules_to_save` module holds full copies of its leaves.

`apply` folds `lora_a`/`lora_b` into the module's `kernel` (W + scale * A @ B) and replaces every
other leaf by the adapter's copy. It is the only thing a LoRA training step differentiates, so
`jax.grad(loss)(adapters)` never forms gradients for the frozen base.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax import lora
  >>> params = {"enc": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}}
  >>> cfg = lora.LoraConfig(r=2, alpha=4, targets=("query",))
  >>> adapters = lora.init(jax.random.key(0), params, cfg)
  >>> sorted(adapters["enc.query"])
  ['lora_a', 'lora_b']
  >>> new = lora.apply(params, adapters, cfg)   # B = 0: same function as the base
  >>> bool(jnp.all(new["enc"]["query"]["kernel"] == params["enc"]["query"]["kernel"]))
  True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax import sharding
from lora_jax.errors import ConfigError
from lora_jax.lora.config import Fusion, LoraConfig, LoraInit
from lora_jax.lora.targets import Plan, get_module, resolve

__all__ = [
    "Adapters",
    "LoraCount",
    "apply",
    "count",
    "init",
    "init_pissa",
    "logical_axes",
    "merge",
    "trainable_mask",
    "unmerge",
]

Adapters = dict[str, dict[str, jax.Array]]
LORA_LEAVES = ("lora_a", "lora_b")


def _copy_tree(params: Mapping) -> dict:
    """Shallow structural copy of the nested dicts (leaves shared), so updates never mutate."""
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in params.items()}


def init(key: jax.Array, params: Mapping, cfg: LoraConfig) -> Adapters:
    """Creates the adapters pytree for `params`.

    Args:
      key: a `jax.random.key` (or legacy PRNGKey); split per target in params order.
      params: base params (nested dict; Linear kernels (in, out)).
      cfg: the configuration; `cfg.init` must be `KAIMING_UNIFORM` or `GAUSSIAN`.

    Returns:
      `{module path: {leaf: array}}` with `lora_a` (in, r), `lora_b` (r, out) = 0 per target, in
      the kernel's dtype, plus copies of trainable biases and `modules_to_save` leaves.

    Raises:
      ValueError: `cfg.init` is `PISSA` (use `init_pissa`), or targeting fails (see `resolve`).
    """
    if cfg.init is LoraInit.PISSA:
        raise ConfigError(
            "LoraConfig.init = 'pissa' replaces the base weights by their residual, so it has its "
            "own entry point. Fix: residual, adapters = lora.init_pissa(params, cfg)."
        )
    plan = resolve(params, cfg)
    keys = jax.random.split(key, max(len(plan.lora), 1))
    adapters: Adapters = {}
    for k, (path, t) in zip(keys, plan.lora.items(), strict=False):
        dtype = get_module(params, plan.keys[path])["kernel"].dtype
        if cfg.init is LoraInit.KAIMING_UNIFORM:
            # torch kaiming_uniform_(a=sqrt(5)) on lora_A.weight (r, in): bound = 1 / sqrt(in).
            bound = 1.0 / math.sqrt(t.in_features)
            a = jax.random.uniform(k, (t.in_features, t.r), dtype, -bound, bound)
        else:  # GAUSSIAN: torch normal_(std=1 / r)
            a = jax.random.normal(k, (t.in_features, t.r), dtype) / t.r
        adapters[path] = {"lora_a": a, "lora_b": jnp.zeros((t.r, t.out_features), dtype)}
    _add_copies(adapters, params, plan)
    return adapters


def init_pissa(params: Mapping, cfg: LoraConfig) -> tuple[dict, Adapters]:
    """PiSSA init: adapters from the top-r singular triplets, base replaced by the residual.

    For each target with kernel W = U S Vh (in, out): A = U_r sqrt(S_r / scale) (in, r),
    B = sqrt(S_r / scale) Vh_r (r, out), and the residual kernel is W - scale * A @ B, so
    `apply(residual, adapters, cfg)` equals `params` at init (up to float rounding). This is
    PEFT's `init_lora_weights="pissa"` (full SVD) in our (in, out) layout.

    Args:
      params: base params.
      cfg: configuration with `init="pissa"`, so that the adapters' config says what they are:
        `save_peft` then refuses them (they are relative to the residual, not the base).

    Returns:
      (residual_params, adapters). Train the adapters on `residual_params`. To use the trained
      adapter on the ORIGINAL base (or export it to PEFT), subtract the initial adapter with
      `combine`: exact, rank 2r, and with a plain config (PEFT's
      `path_initial_model_for_weight_conversion`).

    Raises:
      ValueError: `cfg.init` is not `PISSA`, or targeting fails (see `resolve`).

    Example (a one-layer base; `trained` stands for the adapters after training):
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from lora_jax import lora
      >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
      >>> params = {"layer": {"query": {"kernel": w, "bias": jnp.zeros(6)}}}
      >>> cfg = lora.LoraConfig(r=2, alpha=4, targets="query", init="pissa")
      >>> residual, initial = lora.init_pissa(params, cfg)
      >>> trained = jax.tree.map(lambda x: x * 1.1, initial)
      >>> plain, plain_cfg = lora.combine(
      ...     {"t": (trained, cfg), "i": (initial, cfg)}, {"t": 1.0, "i": -1.0}
      ... )
      >>> on_base = lora.apply(params, plain, plain_cfg)["layer"]["query"]["kernel"]
      >>> on_residual = lora.apply(residual, trained, cfg)["layer"]["query"]["kernel"]
      >>> bool(jnp.allclose(on_base, on_residual, atol=1e-5)), plain["layer.query"]["lora_a"].shape
      (True, (6, 4))
      >>> import tempfile
      >>> lora.save_peft(tempfile.mkdtemp(), plain, plain_cfg)  # a plain adapter of the base
      >>> lora.save_peft(tempfile.mkdtemp(), trained, cfg)
      Traceback (most recent call last):
      ...
      lora_jax.errors.ConfigError: PiSSA adapters only work on the residual base. ...
    """
    if cfg.init is not LoraInit.PISSA:
        raise ConfigError(
            f"lora.init_pissa needs a LoraConfig with init='pissa' (got init={cfg.init.value!r}), "
            "so that the adapters' config records that they are relative to the residual base "
            "(save_peft refuses them). Fix: cfg = dataclasses.replace(cfg, init='pissa')."
        )
    plan = resolve(params, cfg)
    residual = _copy_tree(params)
    adapters: Adapters = {}
    for path, t in plan.lora.items():
        module = get_module(residual, plan.keys[path])
        w = module["kernel"]
        u, s, vh = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[: t.r] / t.scale)  # (r,)
        a = u[:, : t.r] * root[None, :]  # (in, r)
        b = root[:, None] * vh[: t.r]  # (r, out)
        module["kernel"] = (w.astype(jnp.float32) - t.scale * a @ b).astype(w.dtype)
        adapters[path] = {"lora_a": a.astype(w.dtype), "lora_b": b.astype(w.dtype)}
    _add_copies(adapters, params, plan)
    return residual, adapters


def _add_copies(adapters: Adapters, params: Mapping, plan: Plan) -> None:
    for path in plan.bias:
        adapters.setdefault(path, {})["bias"] = get_module(params, plan.keys[path])["bias"]
    for path, leaves in plan.saved.items():
        module = get_module(params, plan.keys[path])
        adapters.setdefault(path, {}).update({leaf: module[leaf] for leaf in leaves})


def check_fits(params: Mapping, adapters: Mapping, cfg: LoraConfig) -> Plan:
    """Checks that `adapters` hold exactly the leaves and shapes `cfg` implies for `params`.

    Raises:
      ValueError: naming missing, unexpected or mis-shaped adapter leaves.
    """
    plan = resolve(params, cfg)
    want = plan.leaf_shapes(params)
    got: dict[tuple[str, str], tuple[int, ...]] = {}
    for path, leaves in adapters.items():
        if not isinstance(leaves, Mapping):
            raise ConfigError(
                f"adapters[{path!r}] is a {type(leaves).__name__}; expected a dict of leaves "
                "({'lora_a': ..., 'lora_b': ...}). Adapters are {module path: {leaf: array}}."
            )
        for leaf, x in leaves.items():
            got[(path, leaf)] = tuple(jnp.shape(x))
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or bad:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} leaves, e.g. {_fmt(missing)}")
        if extra:
            lines.append(f"unexpected {len(extra)} leaves, e.g. {_fmt(extra)}")
        if bad:
            lines.append(
                "wrong shapes: "
                + ", ".join(
                    f"{p}.{n} got {got[(p, n)]} expected {want[(p, n)]}" for p, n in bad[:4]
                )
            )
        raise ConfigError(
            "adapters do not fit these params under this LoraConfig: "
            + "; ".join(lines)
            + ". Fix: create adapters with lora.init(key, params, cfg) for the same base and "
            "config (rank, rank_pattern, targets, bias, modules_to_save)."
        )
    return plan


def _fmt(keys: list[tuple[str, str]], n: int = 4) -> str:
    return str([f"{p}.{leaf}" for p, leaf in keys[:n]])


def _fold(
    params: Mapping,
    adapters: Mapping,
    plan: Plan,
    mode: str,
    dropout_rate: float = 0.0,
) -> dict:
    """Shared body of apply/merge/unmerge. mode: 'merge', 'unmerge', 'fused' or 'auto'.

    With a positive ``dropout_rate`` every LoRA module is fused and also gets ``lora_dropout``
    (the rate, a Python float), which the model's ``dense`` applies with the key it is called
    with.
    """
    use_dropout = dropout_rate > 0.0
    if use_dropout:
        mode = "fused"
    out = _copy_tree(params)
    for path, leaves in adapters.items():
        module = get_module(out, plan.keys[path])
        for leaf, value in leaves.items():
            if leaf not in LORA_LEAVES:
                module[leaf] = value
        if "lora_a" not in leaves:
            continue
        t = plan.lora[path]
        a, b = leaves["lora_a"], leaves["lora_b"]
        w = module["kernel"]
        if mode == "fused" or (mode == "auto" and _fused_is_cheaper(t)):
            module["lora_a"] = a
            module["lora_b"] = b
            module["lora_scale"] = jnp.asarray(t.scale, dtype=w.dtype)
            if use_dropout:
                module["lora_dropout"] = dropout_rate
        else:
            delta = (t.scale * (a @ b)).astype(w.dtype)  # (in, out)
            module["kernel"] = w - delta if mode == "unmerge" else w + delta
    return out


def _fused_is_cheaper(t) -> bool:
    """Training-step FLOP rule: merged costs one extra (in x out) weight-gradient matmul per token;
    fused costs about 3 r (in + out) per token (x A, its gradient, and dy B^T)."""
    return 3 * t.r * (t.in_features + t.out_features) < t.in_features * t.out_features


def apply(
    params: Mapping,
    adapters: Mapping,
    cfg: LoraConfig,
    *,
    fusion: Fusion | str = Fusion.MERGED,
    dropout: bool = False,
) -> dict:
    """Returns the adapted params; pure, jittable, differentiable with respect to `adapters`.

    Args:
      params: base params (not modified).
      adapters: from `init`, `init_pissa`, `load` or `load_peft`, for this base and config.
      cfg: the configuration the adapters were made with.
      fusion: how each LoRA module is computed (:class:`Fusion`: `merged`, the default, `fused`
        or `auto`). Why it matters: differentiating the merged path w.r.t. A and B forms the
        full (in, out) gradient x^T dy of the merged kernel, one extra big matmul per targeted
        Linear per step; the fused path needs only rank-r products, which pays from a width of
        a few hundred (``benchmarks/README.md``, "Merged or fused LoRA"). Use `auto` (or
        `fused`) for training this library's encoders.
      dropout: True for training with `cfg.dropout` (PEFT's `lora_dropout`) on the input of
        each LoRA branch, `x W + scale * dropout(x) A B`: every LoRA module is then fused
        whatever `fusion` says and carries its rate; the masks' keys are an argument of the
        model's forward pass (its `dropout_rng`), not part of the params. False (default), or
        `cfg.dropout == 0`: no dropout (evaluation).

    Returns:
      A params pytree for the model's `apply_fn`; leaves of trainable biases and
      `modules_to_save` modules come from `adapters`.

    Raises:
      ValueError: the adapters do not fit (missing / unexpected leaves, wrong shapes).
    """
    plan = check_fits(params, adapters, cfg)
    mode = {Fusion.AUTO: "auto", Fusion.FUSED: "fused", Fusion.MERGED: "merge"}[_fusion(fusion)]
    return _fold(params, adapters, plan, mode, cfg.dropout if dropout else 0.0)


def _fusion(value: Fusion | str) -> Fusion:
    try:
        return Fusion(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in Fusion)
        raise ConfigError(f"fusion={value!r} is not one of {allowed}.") from None


def merge(params: Mapping, adapters: Mapping, cfg: LoraConfig) -> dict:
    """Folds the adapters into a new base (W + scale * A @ B; biases and saved modules copied).

    Numerically the same as `apply(..., fusion='merged')`; named for the intent of producing a plain
    model (PEFT's `merge_and_unload`).
    """
    return apply(params, adapters, cfg)


def unmerge(merged_params: Mapping, adapters: Mapping, cfg: LoraConfig) -> dict:
    """Inverse of `merge` for the LoRA kernels: W = W' - scale * A @ B.

    Biases and `modules_to_save` leaves that the adapters replaced cannot be recovered from the
    merged params (PEFT keeps the originals for that); they stay as in `merged_params`. Returns
    the base within float rounding.
    """
    plan = check_fits(merged_params, adapters, cfg)
    lora_only = {p: {k: v for k, v in d.items() if k in LORA_LEAVES} for p, d in adapters.items()}
    lora_only = {p: d for p, d in lora_only.items() if d}
    return _fold(merged_params, lora_only, plan, "unmerge")


def trainable_mask(params: Mapping, cfg: LoraConfig) -> dict:
    """Bool pytree shaped like `params`: True where LoRA training changes the leaf.

    True for the kernels of targeted Linears (through their low-rank update), for trainable biases
    (`cfg.bias`) and for every leaf of `modules_to_save` modules; False elsewhere. Use it for
    reporting, or with `optax.masked` / `ntk` tools to select the same parameter subset.
    """
    plan = resolve(params, cfg)
    mask = jax.tree.map(lambda _: False, params)
    for path in plan.lora:
        get_module(mask, plan.keys[path])["kernel"] = True
    for path in plan.bias:
        get_module(mask, plan.keys[path])["bias"] = True
    for path, leaves in plan.saved.items():
        module = get_module(mask, plan.keys[path])
        for leaf in leaves:
            module[leaf] = True
    return mask


class LoraCount(NamedTuple):
    """Parameter counts of a LoRA setup; `str()` gives a table.

    Attributes:
      trainable: number of scalars in the adapters pytree.
      total: base parameters plus the LoRA factors (what the adapted model holds).
      base: base parameters.
      rows: (module path, kind, shape description, trainable count) per adapters entry, kind in
        'lora', 'bias', 'saved'.
    """

    trainable: int
    total: int
    base: int
    rows: tuple[tuple[str, str, str, int], ...]

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = ("module", "kind", "shapes", "trainable")
        body = [(p, k, s, f"{n:,}") for p, k, s, n in self.rows]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]

        def line(r):
            return " | ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )

        out = [line(head), "-+-".join("-" * w for w in widths), *map(line, body)]
        out.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.4f}"
        )
        return "\n".join(out)


def count(params: Mapping, adapters: Mapping) -> LoraCount:
    """Counts trainable (adapter) vs total parameters, per adapters entry.

    Args:
      params: base params.
      adapters: the adapters pytree.

    Returns:
      A `LoraCount`; `total` = base + LoRA factors (copies of biases / saved modules replace base
      leaves, so they do not add to the total). Same numbers as PEFT's
      `print_trainable_parameters` except that PEFT also counts the frozen originals of
      `modules_to_save` modules in "all params".
    """
    base = sum(int(x.size) for x in jax.tree.leaves(params))
    rows, trainable, extra = [], 0, 0
    for path, leaves in adapters.items():
        n = sum(int(jnp.size(x)) for x in leaves.values())
        trainable += n
        if "lora_a" in leaves:
            kind = "lora"
            extra += int(jnp.size(leaves["lora_a"])) + int(jnp.size(leaves["lora_b"]))
        elif set(leaves) == {"bias"}:
            kind = "bias"
        else:
            kind = "saved"
        shapes = ", ".join(f"{k}{tuple(jnp.shape(v))}" for k, v in leaves.items())
        rows.append((path, kind, shapes, n))
    return LoraCount(trainable=trainable, total=base + extra, base=base, rows=tuple(rows))


def logical_axes(adapters: Mapping) -> dict:
    """Logical axis names of every adapters leaf, for sharding rules (same structure).

    `lora_a` gets (in axis of its kernel, 'lora_rank'), `lora_b` ('lora_rank', out axis), and
    copies of biases / saved modules the names of the base leaf they replace (see
    `lora_jax.sharding.leaf_axes`, the one table the models use).
    """
    return sharding.logical_axes(dict(adapters))


def tree_paths(tree: Any) -> list[str]:
    """Dotted paths of the leaves of a nested dict (helper for messages and tests)."""
    return [
        ".".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree.leaves_with_path(tree)
    ]
