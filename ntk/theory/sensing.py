"""The linearized LoRA model of a real network as an explicit matrix-sensing problem.

Linearized in the base weights at W0 (Jang et al.), the outputs on N training examples are

    f(a) = f0 + sum_l scale_l < J_l, A_l @ B_l >          J_l = d f / d W_l  [N, K, m, n]

over the adapted kernels W_l (m x n). :func:`lora_jacobians` computes f0 and every J_l once
(reverse mode, in chunks of examples); :func:`outputs` then evaluates the linearized model for
any adapters with one contraction per matrix, so trajectories of thousands of full-batch steps
cost seconds instead of a forward and a JVP of the encoder per step. It is the same function
as :func:`ntk.lora_linearized_model_fn` (tested against it), restricted to adapted kernels
(no trainable biases or saved modules).

Memory: ``N K sum_l m_l n_l`` floats (MiniLM, query + value in 6 layers, 16-shot binary:
64 x 12 x 384^2 x 4 B = 453 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora
from lora_jax import params as params_lib

__all__ = ["SensingProblem", "gram", "lora_jacobians", "outputs"]


class SensingProblem(NamedTuple):
    """Measurements of the linearized LoRA model on one batch."""

    f0: jax.Array  # shape=(N, K): outputs at W0.
    jac: dict[str, jax.Array]  # module path -> (N, K, m, n): d f / d kernel.
    scale: dict[str, float]  # module path -> LoRA scale alpha / r (or / sqrt(r)).


def lora_jacobians(
    output_fn: Callable,
    params: Mapping,
    lora_config: lora.LoraConfig,
    batch: Mapping[str, Any],
    *,
    chunk: int = 4,
) -> SensingProblem:
    """f0 and the Jacobians of ``output_fn`` w.r.t. every kernel ``lora_config`` adapts.

    Args:
      output_fn: ``output_fn(params, batch) -> [N, K]``.
      params: the base params W0.
      lora_config: decides which kernels (paths, scales); its rank is irrelevant here.
      batch: dict of ``[N, ...]`` arrays.
      chunk: examples per reverse-mode Jacobian (memory: chunk x K backward passes at once).

    Returns:
      :class:`SensingProblem` (float32 or the params' dtype).
    """
    plan = lora.resolve(params, lora_config)
    flat = params_lib.flatten(params)
    keys = {path: f"{path}.kernel" for path in plan.lora}
    w0 = {path: flat[key] for path, key in keys.items()}
    rest = params_lib.partition(params, lambda p: p not in set(keys.values()))[0]

    def f(sub, b):
        full = params_lib.unflatten({keys[p]: w for p, w in sub.items()})
        return output_fn(params_lib.combine(full, rest), b)

    jac_fn = jax.jit(jax.jacrev(f))
    f_fn = jax.jit(f)
    n = jax.tree.leaves(batch)[0].shape[0]
    f0, parts = [], []
    for start in range(0, n, chunk):
        b = {name: x[start : start + chunk] for name, x in batch.items()}
        f0.append(f_fn(w0, b))
        parts.append(jac_fn(w0, b))  # path -> (c, K, m, n)
    jac = {p: jnp.concatenate([j[p] for j in parts]) for p in plan.lora}
    scale = {p: t.scale for p, t in plan.lora.items()}
    return SensingProblem(jnp.concatenate(f0), jac, scale)


def outputs(problem: SensingProblem, adapters: Mapping) -> jax.Array:
    """``f0 + sum_l scale_l <J_l, A_l B_l>``: [N, K] (adapters: path -> lora_a, lora_b)."""
    out = problem.f0
    for path, j in problem.jac.items():
        delta = adapters[path]["lora_a"] @ adapters[path]["lora_b"]  # (m, n)
        out = out + problem.scale[path] * jnp.einsum("nkab,ab->nk", j, delta.astype(j.dtype))
    return out


def gram(problem: SensingProblem) -> np.ndarray:
    """``[NK, NK]`` kernel ``sum_l <J_l[i], J_l[j]>`` (the eNTK w.r.t. the adapted kernels)."""
    total = 0.0
    for j in problem.jac.values():
        flat = j.reshape(-1, j.shape[2] * j.shape[3])
        total = total + np.asarray(flat @ flat.T, np.float64)
    return total
