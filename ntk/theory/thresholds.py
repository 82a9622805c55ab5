"""Rank conditions of the LoRA landscape in the NTK regime: the symmetric and the manifold count.

Training the linearized LoRA model on N examples with K outputs each fits KN numbers with
low-rank updates ``dW = scale * A @ B`` of every adapted matrix (m x n). Two sufficient
conditions on the rank r are compared:

* **old** (Jang, Lee, Ryu 2024; a Sard / Burer-Monteiro count over symmetric matrices):
  ``r (r + 1) / 2 > KN``. It does not depend on the matrix shapes nor on how many matrices
  are adapted. Its leading-order form ``r > sqrt(2 KN)`` is one rank stricter at KN = 64
  (12, the paper's figure, against 11 for the exact inequality).
* **new** (the paper): the set of m x n matrices of rank <= r is a manifold of dimension
  ``r (m + n) - r^2``; require ``dim > C* . KN`` (``C* ~= 1.35`` under Gaussian-iid features,
  see :mod:`ntk.theory.cstar`). Adapting several matrices adds their dimensions
  (``summed``); ``per_matrix`` asks it of the smallest single adapted matrix.

The shapes come from the params pytree (real arrays or ``jax.ShapeDtypeStruct``) and the
``LoraConfig`` (targets, layers, rank_pattern) through :func:`lora_jax.lora.resolve`, the same
targeting the training code uses.

Example:
  >>> smallest_rank_old(64), smallest_rank_old(64, exact=False)
  (11, 12)
  >>> manifold_dim(1024, 1024, 1)
  2047
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

from lora_jax import lora

__all__ = [
    "PAPER_C_STAR",
    "RankRow",
    "adapted_shapes",
    "covered",
    "manifold_dim",
    "new_condition",
    "old_condition",
    "rank_table",
    "sard_count",
    "smallest_rank_new",
    "smallest_rank_old",
    "total_manifold_dim",
]

#: The paper's phase-transition constant under Gaussian-iid features.
PAPER_C_STAR = 1.35


def sard_count(r: int) -> int:
    """``r (r + 1) / 2``: the dimension of r x r symmetric matrices (the old rule's count)."""
    return r * (r + 1) // 2


def manifold_dim(m: int, n: int, r: int) -> int:
    """``r (m + n) - r^2``: dimension of the m x n matrices of rank exactly r (r <= min(m, n))."""
    if not 0 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must be in [0, min(m, n)] = [0, {min(m, n)}].")
    return r * (m + n) - r * r


def old_condition(r: int, kn: int) -> bool:
    """Jang et al.'s sufficient condition ``r (r + 1) / 2 > KN``."""
    return sard_count(r) > kn


def new_condition(dim: int, kn: int, c_star: float = PAPER_C_STAR) -> bool:
    """The manifold condition ``dim > C* . KN`` (``dim``: one matrix's or the summed dimension)."""
    return dim > c_star * kn


def covered(capacity: float, kn: int) -> int:
    """How many of the KN constraints a strict condition ``capacity > #constraints`` covers.

    ``capacity`` is ``r (r + 1) / 2`` for the old rule and ``dim / C*`` for the new; the largest
    integer count below it, capped at KN.
    """
    return max(0, min(kn, math.ceil(capacity) - 1))


def smallest_rank_old(kn: int, *, exact: bool = True) -> int:
    """The smallest r with ``r (r + 1) / 2 > KN`` (``exact``), or with ``r > sqrt(2 KN)``.

    The two differ by one at KN = 64: 11 * 12 / 2 = 66 > 64 gives r = 11, while the leading
    order ``r^2 / 2 > KN`` (``r >= 11.3``) gives the r = 12 quoted for 16-shot binary tasks.
    """
    if exact:
        r = max(1, math.isqrt(2 * kn) - 1)
        while not old_condition(r, kn):
            r += 1
        return r
    return math.isqrt(2 * kn) + 1


def adapted_shapes(params: Mapping, lora_config: lora.LoraConfig) -> list[lora.LoraTarget]:
    """Every adapted matrix of ``params`` under ``lora_config`` (path, in/out sizes, rank).

    The kernels are ``(in, out)`` = (m, n); the rank is ``LoraConfig.rank_for(path)``. A rank
    above min(m, n) of some kernel is an error here as in training (``lora.resolve``).
    """
    return list(lora.resolve(params, lora_config).lora.values())


def total_manifold_dim(targets: list[lora.LoraTarget]) -> int:
    """Sum of ``r (m + n) - r^2`` over the adapted matrices (each at its own rank)."""
    return sum(manifold_dim(t.in_features, t.out_features, t.r) for t in targets)


class RankRow(NamedTuple):
    """Both conditions at one default rank r (per-matrix ranks follow ``rank_pattern``)."""

    r: int
    sard: int  # r (r + 1) / 2
    old: bool  # sard > KN
    old_covered: int  # constraints covered by the old count (of KN)
    dim_min: int  # manifold dimension of the smallest adapted matrix
    dim_sum: int  # summed over all adapted matrices
    new_per_matrix: bool  # dim_min > C* KN
    new_summed: bool  # dim_sum > C* KN
    new_covered_per_matrix: int  # floor-ish(dim_min / C*), capped at KN
    new_covered_summed: int


def _targets_at(params: Mapping, cfg: lora.LoraConfig, r: int) -> list[lora.LoraTarget]:
    return adapted_shapes(params, dataclasses.replace(cfg, r=r))


def max_rank(params: Mapping, cfg: lora.LoraConfig) -> int:
    """The largest default rank every adapted matrix allows (min over min(m, n))."""
    return min(min(t.in_features, t.out_features) for t in _targets_at(params, cfg, 1))


def rank_table(
    params: Mapping,
    lora_config: lora.LoraConfig,
    kn: int,
    ranks: tuple[int, ...] | range,
    c_star: float = PAPER_C_STAR,
) -> list[RankRow]:
    """Both conditions for each default rank in ``ranks`` (those above the max rank skipped)."""
    if kn < 1:
        raise ValueError(f"KN must be >= 1 (K outputs x N examples), got {kn}.")
    top = max_rank(params, lora_config)
    rows = []
    for r in ranks:
        if r > top:
            continue
        targets = _targets_at(params, lora_config, r)
        dims = [manifold_dim(t.in_features, t.out_features, t.r) for t in targets]
        d_min, d_sum = min(dims), sum(dims)
        rows.append(
            RankRow(
                r=r,
                sard=sard_count(r),
                old=old_condition(r, kn),
                old_covered=covered(sard_count(r), kn),
                dim_min=d_min,
                dim_sum=d_sum,
                new_per_matrix=new_condition(d_min, kn, c_star),
                new_summed=new_condition(d_sum, kn, c_star),
                new_covered_per_matrix=covered(d_min / c_star, kn),
                new_covered_summed=covered(d_sum / c_star, kn),
            )
        )
    return rows


def smallest_rank_new(
    params: Mapping,
    lora_config: lora.LoraConfig,
    kn: int,
    c_star: float = PAPER_C_STAR,
    *,
    summed: bool = True,
) -> int | None:
    """Smallest default rank satisfying the manifold condition (None: no allowed rank does).

    Args:
      summed: compare the dimension summed over all adapted matrices (True) or that of the
        smallest single adapted matrix (False) with ``C* . KN``.
    """
    for r in range(1, max_rank(params, lora_config) + 1):
        (row,) = rank_table(params, lora_config, kn, (r,), c_star)
        if row.new_summed if summed else row.new_per_matrix:
            return r
    return None
