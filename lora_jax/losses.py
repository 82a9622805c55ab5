"""Losses on the K outputs of a few-shot classifier: cross-entropy and squared error.

Both take ``outputs`` of shape ``[B, K]`` (label-word logits at ``<mask>``, or class logits)
and integer ``labels`` of shape ``[B]``, and return a scalar mean over the batch, computed in at
least float32 (bfloat16 logits are upcast first: a bfloat16 softmax keeps 8 bits of mantissa,
too few for the small losses of a fitted few-shot set). The paper
needs both: squared error is the setting of the rank threshold r(r+1)/2 > KN (Jang et al.,
2024), cross-entropy the one with no threshold.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import optax

from lora_jax.errors import ConfigError


class Loss(enum.StrEnum):
    """Training loss on the K outputs.

    CE: softmax cross-entropy over the K outputs (what practitioners use).
    MSE: ``0.5 * ||f(x) - onehot(y)||^2`` summed over K, averaged over the batch; the
      squared-error objective of the NTK / matrix-sensing analysis, whose kernel-regression
      limit is ``ntk`` 's closed-form MSE solver.
    """

    CE = "ce"
    MSE = "mse"


def _at_least_f32(outputs: jax.Array) -> jax.Array:
    return outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))


def cross_entropy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. outputs: [B, K]; labels: [B] int. Returns a scalar."""
    outputs = _at_least_f32(outputs)
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


def squared_error(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of ``0.5 * sum_k (outputs[b, k] - onehot(labels)[b, k])^2``."""
    outputs = _at_least_f32(outputs)
    targets = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1).mean()


def get_loss(loss: Loss | str):
    """Returns the loss function ``(outputs [B, K], labels [B]) -> scalar`` named by ``loss``."""
    try:
        loss = Loss(loss)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in Loss)
        raise ConfigError(f"Unknown loss {loss!r}; expected one of {allowed}.") from None
    return {Loss.CE: cross_entropy, Loss.MSE: squared_error}[loss]
