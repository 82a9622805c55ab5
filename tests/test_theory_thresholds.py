"""ntk.theory.thresholds: both rank conditions on known values and a hand count on a toy model."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from experiments import thresholds as cli
from lora_jax import lora
from ntk.theory import thresholds as th


def test_old_rule_known_values():
    # 10*11/2 = 55 <= 64 < 66 = 11*12/2; leading order: 11^2 = 121 <= 128 < 144 = 12^2.
    assert th.smallest_rank_old(64) == 11
    assert th.smallest_rank_old(64, exact=False) == 12
    assert th.smallest_rank_old(144) == 17  # 16*17/2 = 136 <= 144 < 153
    assert th.smallest_rank_old(576) == 34  # 33*34/2 = 561 <= 576 < 595
    assert [th.covered(th.sard_count(r), 64) for r in (1, 4, 11, 12)] == [0, 9, 64, 64]


def test_new_rule_roberta_large_shapes_kn_64():
    params = cli.model_params("roberta-large")  # abstract: shapes only
    cfg = lora.LoraConfig(r=1, alpha=2.0, targets="query|value")
    targets = th.adapted_shapes(params, cfg)
    assert len(targets) == 48 and {(t.in_features, t.out_features) for t in targets} == {
        (1024, 1024)
    }
    assert th.manifold_dim(1024, 1024, 1) == 2047  # 2047 > 1.35 * 64 = 86.4
    assert th.smallest_rank_new(params, cfg, 64) == 1
    assert th.smallest_rank_new(params, cfg, 64, summed=False) == 1
    # One 1024 x 1024 matrix at r = 1 covers at most ceil(2047 / 1.35) - 1 = 1516 constraints.
    assert th.smallest_rank_new(params, cfg, 1517, summed=False) == 2
    assert th.smallest_rank_new(params, cfg, 1516, summed=False) == 1


def _toy():
    def linear(n_in, n_out):
        return {"kernel": jnp.zeros((n_in, n_out)), "bias": jnp.zeros((n_out,))}

    layer = lambda: {"query": linear(6, 6), "key": linear(6, 6), "value": linear(6, 4)}  # noqa: E731
    return {"enc": {"layer": {0: layer(), 1: layer()}, "head": linear(6, 2)}}


def test_summed_dimension_equals_hand_count_with_rank_pattern():
    params = _toy()
    cfg = lora.LoraConfig(r=2, alpha=2.0, targets="query|value", rank_pattern={"layer.1.value": 3})
    # Hand count: query 6x6 at r=2: 2*12-4 = 20 (twice); value 6x4 at r=2: 2*10-4 = 16;
    # layer 1's value at r=3: 3*10-9 = 21.
    assert th.total_manifold_dim(th.adapted_shapes(params, cfg)) == 20 + 20 + 16 + 21
    (row,) = th.rank_table(params, cfg, kn=40, ranks=(2,))
    assert (row.dim_min, row.dim_sum) == (16, 77)
    assert row.new_summed and not row.new_per_matrix  # 77 > 54 > 16
    assert row.new_covered_summed == 40 and row.new_covered_per_matrix == 11  # ceil(16/1.35)-1
    # r = 1 everywhere but layer 1's value (pattern keeps 3): 11 + 11 + 9 + 21 = 52 <= 54 < 77.
    assert th.smallest_rank_new(params, cfg, kn=40) == 2
    assert th.max_rank(params, cfg) == 4  # min(6, 4) of the value kernels


def test_cli_prints_both_rules_and_rejects_a_bad_model(capsys):
    cli.main(["--models", "roberta-large", "--num-labels", "2", "--ranks", "1", "12"])
    out = capsys.readouterr().out
    row = "| roberta-large | 48 of 1024x1024 | 2 | 64 | r >= 11 | r >= 12 | r >= 1 | r >= 1 |"
    assert row in out
    with pytest.raises(SystemExit, match="neither a preset"):
        cli.main(["--models", "/no/such/model"])
