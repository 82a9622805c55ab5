"""Exact linearization of a model, for training the linearized model like the real one.

Three forms, one per way the trainable pytree enters the model:

* :func:`linearize` (``nt.linearize``): ``f_lin(p, *args) = f(p0, *args) + J(p0) (p - p0)``,
  the first-order Taylor expansion in the parameters that are trained. Use it for full
  fine-tuning, a regex subset, or the adapters themselves.
* :func:`linearized_model_fn`: the same expansion for ``lora_jax.train``'s
  ``model_fn(trainable, frozen, batch, dropout_rng)``; the expansion point travels inside
  ``frozen`` (as ``(trainable0, frozen)``) instead of being baked into the compiled program,
  so the unchanged training loop (same optax optimizer, same loss) trains the linearized
  model.
* :func:`lora_linearized_model_fn`: the linearized LoRA model of Jang et al. (2024): the
  network is linearized in the *base weights* W at W0 and the update is LoRA-factorized,
  ``f(W0) + <J_W(W0), scale * A @ B>``. It is bilinear in (A, B): low-rank matrix sensing,
  the object of the rank-threshold analysis. (Linearizing in the adapters instead, with
  :func:`linearize`, gives a model that is linear in (A, B) and, at B = 0, only trains B.)

References:
  Lee et al., "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient
  Descent", arXiv:1902.06720, 2019.
  Jang, Lee, Ryu, "LoRA Training in the NTK Regime has No Spurious Local Minima",
  arXiv:2402.11867, 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import lora
from lora_jax import params as params_lib
from lora_jax.lora import core as lora_core
from lora_jax.lora.targets import get_module
from ntk._compat import nt

PyTree = Any

__all__ = [
    "linearize",
    "linearized_model_fn",
    "lora_linearized_model_fn",
    "lora_weight_delta",
]


def linearize(f: Callable[..., Any], params: PyTree) -> Callable[..., Any]:
    """First-order Taylor expansion of ``f`` around ``params`` (``nt.linearize``).

    Args:
      f: ``f(params, *args, **kwargs) -> pytree`` (e.g. ``f(params, batch) -> [N, K]``).
      params: the expansion point p0 (closed over: fine for adapters or a subset; for
        millions of weights under ``jit`` prefer :func:`linearized_model_fn`).

    Returns:
      ``f_lin(p, *args, **kwargs) = f(p0, *args, **kwargs) + J(p0) (p - p0)``, with ``f``'s
      signature. One forward pass and one JVP per call.
    """
    return nt.linearize(f, params)


def linearized_model_fn(model_fn: Callable) -> Callable:
    """Linearizes a training ``model_fn(trainable, frozen, batch, dropout_rng) -> [B, K]``.

    The returned ``lin_fn`` has the same signature, with ``frozen`` replaced by the pair
    ``(trainable0, frozen)``: the expansion point is passed in, not closed over. Train it with
    the unchanged loop, starting from ``trainable0``::

        lin_fn = ntk.linearized_model_fn(model_fn)
        state = init_state(jax.tree.map(jnp.copy, trainable0), opt, seed)
        fit(lin_fn, state, (trainable0, frozen), train, dev, cfg)

    (The copy matters: the training chunk donates its state's buffers, and ``trainable0``
    must stay alive inside ``frozen``.)

    ``lin_fn(trainable, (trainable0, frozen), batch, rng) = model_fn(trainable0, frozen, batch,
    rng) + J(trainable0) (trainable - trainable0)`` (Jang et al. train exactly this with the
    real optimizer and loss).
    """

    def lin_fn(trainable, frozen, batch, dropout_rng=None):
        trainable0, base = frozen
        f = lambda p: model_fn(p, base, batch, dropout_rng)  # noqa: E731
        return nt.linearize(f, trainable0)(trainable)

    return lin_fn


def lora_linearized_model_fn(
    output_fn: Callable, lora_config: Any, *, fusion: lora.Fusion | str = lora.Fusion.MERGED
) -> Callable:
    """The linearized LoRA model of Jang et al.: linear in W, LoRA-factorized update.

    Returns ``lin_fn(adapters, base, batch, dropout_rng=None) -> [B, K]``, the
    ``lora_jax.train`` model-function signature with ``frozen = base`` (the base params W0):

        lin_fn(a, W0, batch) = f(W0, batch) + J_W(W0) . (apply(W0, a) - W0)

    where ``apply`` is ``lora_jax.lora.apply`` (unfused), so ``apply(W0, a) - W0`` is
    ``scale * A @ B`` on adapted kernels (plus any trainable biases / saved modules).

    Args:
      output_fn: ``output_fn(params, batch, dropout_rng=None) -> [B, K]``.
      lora_config: the ``LoraConfig`` of the adapters.
      fusion: how the tangent of each adapted kernel is computed (``lora_jax.lora.Fusion``).
        ``merged`` (default, any ``output_fn``): a JVP over the dense kernel W in the direction
        of the exact ``scale * A @ B`` (:func:`lora_weight_delta`); its gradient with respect
        to A and B passes through a dense (in, out) gradient of every adapted kernel (on a
        data-parallel mesh, all-reduced every step). ``fused``: the same tangent through the
        factors, ``d/dt f(W0 + t scale A B)|_{t=0}`` with the kernel's ``lora_a`` /
        ``lora_b`` / ``lora_scale = t * scale`` leaves, so every tangent matmul is
        ``(x A) B`` and no (in, out) array of the update exists, for an ``output_fn`` that
        computes those leaves as ``x W + lora_scale (x A) B`` (this library's encoders,
        ``lora_jax.models.layers.dense``; another ``output_fn`` would ignore them and lose the
        update). ``auto``: fused where ``lora.apply`` would fuse. Trainable biases and
        ``modules_to_save`` copies always enter by a JVP over their own leaves.
    """
    fusion = lora_core._fusion(fusion)

    def fuses(t) -> bool:
        return fusion == lora.Fusion.FUSED or (
            fusion == lora.Fusion.AUTO and lora_core._fused_is_cheaper(t)
        )

    def lin_fn(adapters, base, batch, dropout_rng=None):
        plan = lora.check_fits(base, adapters, lora_config)
        fused = [p for p, leaves in adapters.items() if "lora_a" in leaves and fuses(plan.lora[p])]
        w0, delta = _weight_delta(base, adapters, plan, skip=set(fused))
        rest = params_lib.partition(base, lambda p: p not in w0)[0] if len(w0) else base

        def f(sub, t):
            params = params_lib.combine(params_lib.unflatten(sub), rest)
            if fused:
                params = lora_core._copy_tree(params)
            for path in fused:  # x W0 + (t * scale) (x A) B
                module = get_module(params, plan.keys[path])
                dtype = module["kernel"].dtype
                module["lora_a"] = adapters[path]["lora_a"]
                module["lora_b"] = adapters[path]["lora_b"]
                module["lora_scale"] = (t * plan.lora[path].scale).astype(dtype)
            return output_fn(params, batch, dropout_rng)

        t = jnp.zeros((), jnp.result_type(float))
        y0, dy = jax.jvp(f, (w0, t), (delta, jnp.ones_like(t)))
        return y0 + dy

    return lin_fn


def lora_weight_delta(params: PyTree, adapters: PyTree, lora_config: Any) -> tuple[dict, dict]:
    """The base leaves LoRA changes and their exact change, as flat ``{dotted path: array}``.

    ``scale * A @ B`` for adapted kernels (computed directly, not as ``(W + dW) - W``, which
    loses the small update to rounding in float32), ``adapter - base`` for trainable biases and
    ``modules_to_save`` copies.

    Returns:
      ``(w0, delta)``: dicts with the same dotted-path keys.
    """
    return _weight_delta(params, adapters, lora.check_fits(params, adapters, lora_config))


def _weight_delta(params, adapters, plan, skip=frozenset()) -> tuple[dict, dict]:
    """:func:`lora_weight_delta` for a checked ``plan``, leaving out the kernels of the module
    paths in ``skip`` (their update taken through the factors)."""
    flat = params_lib.flatten(params)
    w0, delta = {}, {}
    for path, leaves in adapters.items():
        for leaf, value in leaves.items():
            if leaf in ("lora_a", "lora_b"):
                continue
            key = f"{path}.{leaf}"
            w0[key], delta[key] = flat[key], value - flat[key]
        if "lora_a" in leaves and path not in skip:
            key = f"{path}.kernel"
            t = plan.lora[path]
            w0[key] = flat[key]
            delta[key] = (t.scale * (leaves["lora_a"] @ leaves["lora_b"])).astype(flat[key].dtype)
    return w0, delta
