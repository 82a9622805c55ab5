"""The Polyak-Lojasiewicz constant along a gradient-descent trajectory.

A loss satisfies the PL inequality with constant mu on a set when

    ||grad L(theta)||^2 >= 2 mu (L(theta) - L*)

there; along gradient descent it makes the loss fall at least geometrically, so GD reaches the
infimum L* (for cross-entropy on data the model separates, L* = 0, approached but not
attained). :func:`trajectory` runs full-batch GD and records L and ||grad L||^2 each step;
:func:`pl_constants` turns them into the pointwise ratio mu_t. Its minimum over the trajectory
is the PL constant the run actually had, an empirical lower envelope (a bound on the whole
sublevel set would need all of it, not one path).

References:
  Polyak, "Gradient methods for minimizing functionals", 1963.
  Karimi, Nutini, Schmidt, "Linear Convergence of Gradient and Proximal-Gradient Methods
  Under the Polyak-Lojasiewicz Condition", arXiv:1608.04636, 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Trajectory", "pl_constants", "trajectory"]

PyTree = Any


class Trajectory(NamedTuple):
    """Full-batch gradient descent, recorded every step."""

    loss: np.ndarray  # shape=(steps + 1,): L(theta_t), t = 0 .. steps.
    grad_sq: np.ndarray  # shape=(steps + 1,): ||grad L(theta_t)||^2.
    params: PyTree  # theta_steps, the last iterate.
    kept_steps: np.ndarray | None = None  # shape=(k,): the steps of ``kept``, all <= steps.
    kept: PyTree = None  # theta at ``kept_steps``, stacked on a leading axis of length k.


def trajectory(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree = None,
    *,
    steps: int,
    learning_rate: float,
    stop_below: float | None = None,
    keep_steps: Sequence[int] = (),
) -> Trajectory:
    """Up to ``steps`` full-batch GD steps ``theta <- theta - lr grad L`` in one jitted loop.

    Args:
      loss_fn: ``loss_fn(params, data) -> scalar``.
      params: the initial point theta_0 (any pytree of float arrays).
      data: passed to ``loss_fn`` as a jit argument (large arrays closed over instead would be
        baked into the program as constants).
      steps: the most steps.
      learning_rate: the constant step size.
      stop_below: stop at the first iterate with ``L <= stop_below`` (or a non-finite loss);
        the arrays then end there (``len(loss) - 1`` steps were taken). None: all ``steps``.
      keep_steps: steps whose iterates are returned in ``kept`` (those past the last step
        taken are dropped), e.g. to evaluate a kernel along the run afterwards.
    """
    value_and_grad = jax.value_and_grad(loss_fn)
    stop = -jnp.inf if stop_below is None else stop_below

    keep = np.unique(np.asarray([s for s in keep_steps if 0 <= s <= steps], np.int64))
    slot_of = np.full(steps + 1, -1, np.int32)  # step -> its slot in ``kept``, or -1
    slot_of[keep] = np.arange(keep.size, dtype=np.int32)

    def sq_norm(g):
        return sum(jnp.sum(x * x) for x in jax.tree.leaves(g))

    def store(kept, p, slot):
        if not keep.size:
            return kept
        i = jnp.maximum(slot, 0)
        return jax.tree.map(lambda s, x: s.at[i].set(jnp.where(slot >= 0, x, s[i])), kept, p)

    @jax.jit
    def run(params, data, slot_of):
        values = jnp.full(steps + 1, jnp.nan)
        norms = jnp.full(steps + 1, jnp.nan)
        kept = jax.tree.map(lambda x: jnp.zeros((keep.size, *x.shape), x.dtype), params)
        kept = store(kept, params, slot_of[0])
        value, g = value_and_grad(params, data)
        carry = (0, params, value, g, values.at[0].set(value), norms.at[0].set(sq_norm(g)), kept)

        def going(c):
            t, _, value = c[:3]
            return (t < steps) & (value > stop) & jnp.isfinite(value)

        def step(c):
            t, p, _, g, values, norms, kept = c
            p = jax.tree.map(lambda x, d: x - learning_rate * d, p, g)
            value, g = value_and_grad(p, data)
            kept = store(kept, p, slot_of[t + 1])
            values, norms = values.at[t + 1].set(value), norms.at[t + 1].set(sq_norm(g))
            return t + 1, p, value, g, values, norms, kept

        t, last, _, _, values, norms, kept = jax.lax.while_loop(going, step, carry)
        return t, last, values, norms, kept

    t, last, values, norms, kept = run(params, data, jnp.asarray(slot_of))
    t = int(t)
    done = int(np.sum(keep <= t))
    return Trajectory(
        np.asarray(values, np.float64)[: t + 1],
        np.asarray(norms, np.float64)[: t + 1],
        last,
        keep[:done] if keep.size else None,
        jax.tree.map(lambda x: x[:done], kept) if keep.size else None,
    )


def pl_constants(traj: Trajectory, l_star: float = 0.0, *, floor: float = 1e-12) -> np.ndarray:
    """``mu_t = ||grad L_t||^2 / (2 (L_t - L*))`` per step; nan once ``L_t - L* <= floor``.

    Args:
      traj: a :class:`Trajectory`.
      l_star: the infimum of the loss (0 for cross-entropy on separable data and for an
        interpolating squared error; otherwise a fitted value).
      floor: gaps below it are numerically zero (the ratio is then undefined).
    """
    gap = traj.loss - l_star
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > floor, traj.grad_sq / (2 * gap), np.nan)
