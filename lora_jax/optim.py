"""The optax optimizer of a training run, with its peak learning rate kept in the state.

:func:`make_optimizer` chains clipping, AdamW or SGD with warmup and a schedule at peak rate 1,
accumulation, and a final multiplication by the run's learning rate, which ``init`` stores in
the optimizer state (:class:`RateState`). The compiled training program therefore does not
depend on the learning rate: runs that differ only in their rate share one program, and the
members of a job (:func:`lora_jax.train.fit_job`) each carry their own rate. For optax's AdamW
and SGD, which end with a multiplication by ``-rate``, this is the update of
``optax.adamw(rate * schedule)`` (bit-identical with a constant schedule).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from lora_jax.train import TrainConfig


class Optimizer(enum.StrEnum):
    """Optimizer: ``adamw`` (decoupled weight decay) or ``sgd`` (with optional momentum)."""

    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(enum.StrEnum):
    """Learning-rate schedule after linear warmup: constant, linear decay to 0, or cosine."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class RateState(NamedTuple):
    """The peak learning rate of one run, carried in its optimizer state."""

    rate: jax.Array  # shape=(), the default float dtype


def scale_by_rate(rate: float) -> optax.GradientTransformation:
    """Multiplies updates by ``rate``, which ``init`` stores in the state.

    The update reads the rate from the state, so one compiled update serves runs with
    different rates (a job's stacked state holds ``rate`` [n]).
    """

    def init_fn(params):
        del params
        return RateState(jnp.asarray(rate, dtype=jnp.result_type(float)))

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.rate.astype(u.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip -> AdamW / SGD with warmup + schedule at peak 1 -> accumulation -> x learning rate."""
    updates = max(cfg.steps // cfg.grad_accum, 1)
    warmup = cfg.warmup_steps // cfg.grad_accum
    decay = max(updates - warmup, 1)
    after = {
        Schedule.CONSTANT: optax.constant_schedule(1.0),
        Schedule.LINEAR: optax.linear_schedule(1.0, 0.0, decay),
        Schedule.COSINE: optax.cosine_decay_schedule(1.0, decay),
    }[cfg.schedule]
    lr = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), after], [warmup])
    if cfg.optimizer == Optimizer.ADAMW:
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    if cfg.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return optax.chain(opt, scale_by_rate(cfg.learning_rate))
