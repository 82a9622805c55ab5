"""experiments.stats against closed forms, and the report's rank statistics on a hand-made table.

Oracles: Student t with 1 and 2 degrees of freedom has closed forms (df = 1 is the Cauchy
distribution: two-sided p = 1 - 2 atan(|t|) / pi, quantile tan(pi (u - 1/2)); df = 2: two-sided
p = 1 - |t| / sqrt(2 + t^2), quantile (2u - 1) / sqrt(2 u (1 - u))); sign-flip p-values are
counted by hand over the 2^n sign vectors; report rows were computed by hand from the records.
"""

import math

import numpy as np
import pytest

from experiments import report, stats


def q_df2(u):
    return (2 * u - 1) / math.sqrt(2 * u * (1 - u))


def p_df2(t):
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_t_interval_matches_the_closed_form_quantiles():
    mean, half = stats.t_interval([0.60, 0.64, 0.68])  # sd 0.04, n 3, df 2
    assert mean == pytest.approx(0.64)
    assert q_df2(0.975) == pytest.approx(4.302652729, rel=1e-9)  # the table value
    assert half == pytest.approx(q_df2(0.975) * 0.04 / math.sqrt(3), rel=1e-9)
    mean, half = stats.t_interval([0.5, 0.7])  # df 1: sd = 0.1 sqrt 2, se = 0.1
    assert half == pytest.approx(math.tan(math.pi * 0.475) * 0.1, rel=1e-9)
    assert math.isnan(stats.t_interval([0.3])[1])


def test_paired_test_pairs_by_seed_and_matches_the_df2_closed_form():
    a = {13: 0.70, 21: 0.66, 42: 0.71}
    b = {42: 0.66, 13: 0.68, 21: 0.65, 87: 0.90}  # seed 87 has no pair: left out
    test = stats.paired_test(a, b)
    d = np.array([0.02, 0.01, 0.05])
    sd = math.sqrt(((d - d.mean()) ** 2).sum() / 2)
    t = d.mean() / (sd / math.sqrt(3))
    assert (test.n, test.df) == (3, 2)
    assert test.mean_b == pytest.approx((0.68 + 0.65 + 0.66) / 3)
    assert test.diff == pytest.approx(0.08 / 3)
    assert test.t == pytest.approx(t, rel=1e-9) and t == pytest.approx(2.2188, abs=1e-4)
    assert test.p == pytest.approx(p_df2(t), rel=1e-9)
    assert test.half == pytest.approx(q_df2(0.975) * sd / math.sqrt(3), rel=1e-9)
    assert test.within_noise  # p = 0.157
    assert test.p_sign_flip == pytest.approx(0.25)  # |±2 ±1 ±5| >= 8 for 2 of 8 sign vectors


def test_paired_test_df1_and_degenerate_differences():
    test = stats.paired_test({1: 0.9, 2: 0.8}, {1: 0.7, 2: 0.5})  # d = 0.2, 0.3: t = 5
    assert test.t == pytest.approx(5.0)
    assert test.p == pytest.approx(1 - 2 * math.atan(5.0) / math.pi, rel=1e-9)
    same = stats.paired_test({1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.7})
    assert same.p == 1.0 and same.within_noise and same.p_sign_flip == 1.0
    shifted = stats.paired_test({1: 0.7, 2: 0.8, 3: 0.9}, {1: 0.6, 2: 0.7, 3: 0.8})
    assert shifted.t == math.inf and shifted.p == 0.0 and not shifted.within_noise
    # Zero variance: all differences 0 give t = 0 (p = 1); 0 up to float rounding (0.1 + 0.2
    # is 0.30000000000000004) is the same, not an infinitely significant difference; the same
    # 10-point difference as 0.7 - 0.6 and 0.9 - 0.8 (which round differently) is t = -inf.
    assert same.t == 0.0 and same.half == 0.0
    noisy = stats.paired_test({1: 0.1 + 0.2, 2: 0.1 + 0.2}, {1: 0.3, 2: 0.3})
    assert (noisy.t, noisy.p, noisy.within_noise) == (0.0, 1.0, True)
    down = stats.paired_test({1: 0.6, 2: 0.8}, {1: 0.7, 2: 0.9})
    assert down.t == -math.inf and down.p == 0.0 and down.diff == pytest.approx(-0.1)
    one = stats.paired_test({1: 0.7}, {1: 0.6})
    assert one.n == 1 and math.isnan(one.p) and math.isnan(one.half)
    assert stats.paired_test({1: 0.7}, {2: 0.6}) is None


def test_t_critical_matches_the_closed_forms():
    assert stats.t_critical(1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # 12.706
    assert stats.t_critical(2) == pytest.approx(q_df2(0.975), rel=1e-9)  # 4.303
    assert stats.t_critical(2, level=0.9) == pytest.approx(q_df2(0.95), rel=1e-9)  # 2.920
    assert math.isnan(stats.t_critical(0))


def test_sign_flip_counts_sign_vectors():
    # (3, -1, 2): |sum| >= 4 for 6, 4, -4, -6 of the 8 sums.
    assert stats.sign_flip_p([3, -1, 2]) == pytest.approx(0.5)
    assert stats.sign_flip_p([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)  # the smallest at n = 5
    assert stats.sign_flip_p(np.ones(24)) < 1e-3  # sampled above n = 20: exact 2^-23


# ----------------------------------------------------------------------------- report tables


def _records(model=None):
    """MR: ranks 1, 4, 12; TREC: ranks 1, 12; three seeds; MR rank 1 has NTK fields."""
    acc = {
        ("mr", 1): (0.70, 0.66, 0.71),
        ("mr", 4): (0.72, 0.70, 0.73),
        ("mr", 12): (0.68, 0.65, 0.66),
        ("trec", 1): (0.50, 0.55, 0.52),
        ("trec", 12): (0.60, 0.62, 0.63),
    }
    lin, kernel = (0.69, 0.66, 0.70), (0.60, 0.58, 0.65)
    records = [
        {"task": "mr", "method": "zero_shot", "rank": None, "seed": 13, "test_accuracy": 0.5}
    ]
    for (task, rank), values in acc.items():
        for i, (seed, value) in enumerate(zip((13, 21, 42), values, strict=True)):
            r = {"task": task, "method": "lora", "rank": rank, "seed": seed, "test_accuracy": value}
            if (task, rank) == ("mr", 1):
                r.update(
                    ntk_acc_trained=value,
                    ntk_acc_linearized_trained=lin[i],
                    ntk_acc_kernel=kernel[i],
                )
            records.append(r)
    if model is not None:
        records = [{**r, "model": model} for r in records]
    return records


def test_rank_test_table_rows_computed_by_hand():
    table = report.rank_test_table(_records())
    # MR: d = 2, 1, 5 points: mean 2.67, sd 2.08, t = 2.22, p = 0.157, half = 4.303 * 1.202.
    assert "| mr | 1 vs 12 | 3 | 69.0 | 66.3 | +2.7 ± 5.2 | 2.22 (2) | 0.157 | 0.250 | " in table
    assert table.splitlines()[2].endswith("| within noise |")
    # TREC: d = -10, -7, -11: mean -9.33, sd 2.08, t = -7.77, p = 0.016: rank 12 is better.
    trec = "| trec | 1 vs 12 | 3 | 52.3 | 61.7 | -9.3 ± 5.2 | -7.77 (2) | 0.016 | 0.250 |"
    assert trec + " r=12 better |" in table
    # Without rank 12 the largest rank above 1 is the comparison.
    no12 = [r for r in _records() if r["rank"] != 12]
    assert "| mr | 1 vs 4 | 3 |" in report.rank_test_table(no12)
    assert report.rank_test_table([r for r in _records() if r["rank"] in (None, 1)]) == ""
    one_seed = [r for r in _records() if r["seed"] == 13]
    assert "| mr | 1 vs 12 | 1 | 70.0 | 68.0 | +2.0 |  |  | 1.000 | one seed: no test |" in (
        report.rank_test_table(one_seed)
    )
    assert "| mr | 4 | 72.0 | 1 |  | -2.0 |" in report.best_rank_table(one_seed)


def test_best_mean_rank_breaks_ties_to_the_smaller_rank():
    by_rank = {12: {1: 0.7, 2: 0.8}, 4: {1: 0.8, 2: 0.7}, 1: {1: 0.6, 3: 0.7}}
    assert report.best_mean_rank(by_rank) == 4  # 4 and 12 both average 0.75
    assert report.best_mean_rank(by_rank, among=[1, 12]) == 12
    groups = report.lora_groups(_records())
    assert set(groups) == {(None, "mr"), (None, "trec")}  # zero-shot left out
    assert groups[None, "mr"][4] == {13: 0.72, 21: 0.70, 42: 0.73}


def test_best_rank_table_rows_computed_by_hand():
    table = report.best_rank_table(_records())
    # MR: means 69.0 / 71.7 / 66.3: best 4 (sd 1.53, half 3.8). Rank 1 vs 4: d = -2, -4, -2,
    # t = -4, p = 1 - 4/sqrt(18) = 0.057 (within noise); rank 12 vs 4: t = -6.05, p = 0.026.
    assert "| mr | 4 | 71.7 ± 3.8 | 3 | 1, 4 | -2.7 (0.057) |" in table
    assert "| trec | 12 | 61.7 ± 3.8 | 3 | 12 | -9.3 (0.016) |" in table


def test_ntk_gap_table_rows_computed_by_hand():
    table = report.ntk_gap_table(_records())
    # Fine-tuned 70, 66, 71 (sd 2.65, half 6.6); minus linearized 1, 0, 1 (half 4.303 / 3);
    # minus kernel 10, 8, 6 (sd 2, half 4.303 * 2 / sqrt 3 = 4.97).
    assert "| mr | 1 | 3 | 69.0 ± 6.6 | +0.7 ± 1.4 | +8.0 ± 5.0 |" in table
    assert len(table.splitlines()) == 3  # header, rule, the one rank with NTK fields
    assert report.ntk_gap_table([r for r in _records() if "ntk_acc_trained" not in r]) == ""


def test_several_encoders_get_an_encoder_column_and_a_section_each(tmp_path):
    records = _records("enc-a") + _records("enc-b")
    assert "| encoder | task | ranks |" in report.rank_test_table(records)
    assert "| enc-b | trec | 1 vs 12 | 3 |" in report.rank_test_table(records)
    config = {"name": "both", "k": 16, "steps": 4, "loss": "ce", "seeds": [13, 21, 42]}
    plots = report.plot_accuracy_vs_rank(str(tmp_path), records)
    text = open(report.write_report(str(tmp_path), config, records, plots)).read()
    assert "Encoders `enc-a`, `enc-b`" in text
    assert text.index("## enc-a") < text.index("## enc-b") < text.index("## Rank 1 vs rank 12 (or")
    assert "## Best rank" in text and "## Fine-tuning vs NTK predictions" in text
    assert (tmp_path / "plots" / "accuracy_vs_rank.png").stat().st_size > 1000


# --- the equivalence test (two one-sided tests) ----------------------------------------------


def sf_df2(t):
    """P(T_2 >= t), closed form: (1 - t / sqrt(2 + t^2)) / 2."""
    return 0.5 * (1 - t / math.sqrt(2 + t * t))


@pytest.mark.parametrize("x", [-2.5, -0.4, 0.0, 1.3, 3.0])
def test_equivalence_test_matches_the_df2_closed_form(x):
    # d = (x - 1, x, x + 1): mean x, sd 1, se 1 / sqrt 3, df 2; margin 2.
    eq = stats.equivalence_test([x - 1, x, x + 1], 2.0)
    t_lower, t_upper = (x + 2) * math.sqrt(3), (x - 2) * math.sqrt(3)
    assert eq.p_lower == pytest.approx(sf_df2(t_lower), rel=1e-9, abs=1e-15)
    assert eq.p_upper == pytest.approx(1 - sf_df2(t_upper), rel=1e-9, abs=1e-15)
    assert eq.p == max(eq.p_lower, eq.p_upper)
    half = q_df2(0.95) / math.sqrt(3)  # the 90% interval: t_{0.95, 2} = 2.92
    assert (eq.low, eq.high) == (pytest.approx(x - half), pytest.approx(x + half))
    # TOST at 5% rejects both nulls exactly when the 90% interval lies inside (-2, 2).
    assert eq.equivalent == (-2 < eq.low and eq.high < 2)
    assert eq.worse == (eq.high < -2) and eq.better == (eq.low > 2)


def test_equivalence_boundary_is_the_t_quantile():
    # mean x, se 1 / sqrt 3: equivalent iff |x| + 2.91999 / sqrt 3 < 2, i.e. |x| < 0.31414.
    edge = 2 - q_df2(0.95) / math.sqrt(3)
    assert edge == pytest.approx(0.31414, abs=1e-5)
    assert stats.equivalence_test([edge - 1e-4 + d for d in (-1, 0, 1)], 2.0).equivalent
    assert not stats.equivalence_test([edge + 1e-4 + d for d in (-1, 0, 1)], 2.0).equivalent
    assert not stats.equivalence_test([-edge - 1e-4 + d for d in (-1, 0, 1)], 2.0).equivalent
    # Low power is no equivalence: the same mean 0 with a spread of 10 points.
    assert not stats.equivalence_test([-10.0, 0.0, 10.0], 2.0).equivalent


def test_one_sided_p_df1_cauchy_and_degenerate_spreads():
    # d = (x - 0.5, x + 0.5): mean x, sd 1 / sqrt 2, se 1 / 2, t = 2 (x - shift); df 1:
    # P(T_1 >= t) = 1/2 - atan(t) / pi.
    p = stats.one_sided_p([0.5, 1.5], 0.25, greater=True)
    assert p == pytest.approx(0.5 - math.atan(1.5) / math.pi, rel=1e-9)
    assert stats.one_sided_p([0.5, 1.5], 0.25, greater=False) == pytest.approx(1 - p)
    assert stats.one_sided_p([3.0, 3.0], 2.0, greater=True) == 0.0
    assert stats.one_sided_p([3.0, 3.0], 2.0, greater=False) == 1.0
    assert math.isnan(stats.one_sided_p([1.0], 0.0, greater=True))
    one = stats.equivalence_test([1.0], 2.0)
    assert math.isnan(one.p) and not one.equivalent and not one.worse
    with pytest.raises(ValueError, match="margin"):
        stats.equivalence_test([1.0, 2.0], 0.0)
