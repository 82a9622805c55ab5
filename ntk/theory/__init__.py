"""ntk.theory: the rank-threshold paper's claims as code.

One idea per module: :mod:`~ntk.theory.thresholds` (the old and the manifold rank conditions),
:mod:`~ntk.theory.cstar` (the constant C* by simulation), :mod:`~ntk.theory.scaling`
(a transition point's limit as the budget or the size grows), :mod:`~ntk.theory.pl` (the
Polyak-Lojasiewicz constant along a trajectory), :mod:`~ntk.theory.bias_variance` (fit and
complexity terms over rank).
"""

from ntk.theory import thresholds
from ntk.theory.thresholds import (
    PAPER_C_STAR,
    adapted_shapes,
    manifold_dim,
    rank_table,
    sard_count,
    smallest_rank_new,
    smallest_rank_old,
)

__all__ = [
    "PAPER_C_STAR",
    "adapted_shapes",
    "manifold_dim",
    "rank_table",
    "sard_count",
    "smallest_rank_new",
    "smallest_rank_old",
    "thresholds",
]
