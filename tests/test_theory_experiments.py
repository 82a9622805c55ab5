"""experiments.cstar / pl / bias_variance / paper_claims entry points, on tiny sizes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import bias_variance, cstar, paper_claims, pl
from lora_jax.errors import ConfigError, MissingFileError
from lora_jax.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def test_cstar_cli_writes_report_and_resumes(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--shapes", "4x3x1", "--solvers", "lm", "--draws", "4"]
    args += ["--rhos", "0.8", "1.5", "--tols", "1e-4", "--tol", "1e-4"]
    cstar.main(args)
    out = capsys.readouterr().out
    assert "| 4x3x1 | 6 | 1.500 | lm | 300 |" in out
    points = (tmp_path / "cstar" / "points.jsonl").read_text().splitlines()
    assert len(points) == 2 and (tmp_path / "cstar" / "plots" / "cstar.png").exists()
    cstar.main(args)  # resumes: nothing recomputed
    assert len((tmp_path / "cstar" / "points.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        cstar.main(["--shapes", "4x3x9"])


@pytest.mark.slow
def test_pl_and_bias_variance_run_on_a_tiny_model(tiny_roberta, tmp_path):
    common = {"model": tiny_roberta, "k": 2, "max_length": 16, "out": str(tmp_path)}
    res = pl.run(pl.PLConfig(task="mr", steps=5, layers=(), **common))
    for name in ("ce", "mse"):
        assert len(res[name]["loss"]) == 6 and res[name]["loss_end"] < res[name]["loss_start"]
    assert "| ce |" in pl.markdown(res)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records("mr", {1: [60, 62, 58]})))
    bcfg = bias_variance.BiasVarianceConfig(
        tasks=("mr",), ranks=(1, 2), steps=3, draws=4, layers=(), **common
    )
    out = bias_variance.run(bcfg)
    (task,) = out["tasks"]
    assert task["best_rank"] in (1, 2) and len(task["fit"]) == 2
    assert np.all(np.diff(task["complexity"]) >= 0)  # the Ky Fan norm grows with r
    saved = json.loads((tmp_path / "bias_variance" / "bias_variance.json").read_text())
    assert saved["tasks"][0]["ranks"] == [1, 2] and out["comparison"] == {}
    # The same curves (resumed, not recomputed) with measured errors beside them.
    again = bias_variance.run(dataclasses.replace(bcfg, finetune_results=str(results)))
    assert again["tasks"] == out["tasks"]
    assert again["comparison"]["mr"]["measured"][1][0] == pytest.approx(0.4)
    assert "| 1 | " in again["markdown"] and "40.0 ± 2.0 (3) |" in again["markdown"]


def test_rank_verdict_paired_difference_and_t_by_hand():
    v = paper_claims.rank_verdict(
        {1: {1: 0.80, 2: 0.82, 3: 0.79}, 4: {1: 0.78, 2: 0.81, 3: 0.80}},
        multiclass=False,
        margin=2.0,
    )
    d = np.array([2.0, 1.0, -1.0])  # r = 1 minus r = 4, in points
    assert v["n"] == 3 and v["gap"] == pytest.approx(-d.mean())
    assert v["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))


# t_{0.975} at 1 and 2 degrees of freedom from closed forms (1 df: Cauchy, tan(pi (u - 1/2));
# 2 df: (2u - 1) / sqrt(2 u (1 - u))): 12.7062 and 4.3027.
T975_DF1 = float(np.tan(np.pi * 0.475))
T975_DF2 = 0.95 / float(np.sqrt(2 * 0.975 * 0.025))


# --- the rank sweep's verdict (paper_claims.rank_verdict) on synthetic accuracies -----------


def _by_rank(**ranks):
    """rank -> seed -> accuracy from ``r1=[...]``, ``r4=[...]`` (in %, seeds 13, 21, 42, ...)."""
    seeds = (13, 21, 42, 87, 100)
    return {
        int(k[1:]): {s: a / 100 for s, a in zip(seeds, v, strict=False)} for k, v in ranks.items()
    }


@pytest.mark.parametrize(
    "ranks, multiclass, verdict, best",
    [
        # binary: rank 1 has the best mean.
        ({"r1": [81, 80, 82], "r4": [80, 80, 81]}, False, "supported", 1),
        # binary: d = [-1, 2, -2]: gap 1/3 point, t = -0.29: within noise and the margin.
        ({"r1": [80, 82, 78], "r4": [81, 80, 80]}, False, "supported", 4),
        # binary: d = [-10, -11, -9] (t = -17.3 < -4.30): significantly worse.
        ({"r1": [70, 69, 71], "r12": [80, 80, 80]}, False, "not supported", 12),
        # binary: d = [-10, 1, -12]: t = -1.73, within noise, but 7 points behind.
        ({"r1": [70, 81, 68], "r12": [80, 80, 80]}, False, "inconclusive", 12),
        # multi-class: significantly worse: the best rank is above 1.
        ({"r1": [70, 69, 71], "r4": [75, 74, 77], "r12": [80, 80, 80]}, True, "supported", 12),
        # multi-class: rank 1 is best.
        ({"r1": [81, 80, 82], "r12": [80, 80, 81]}, True, "not supported", 1),
        # multi-class: within noise and 1/3 point behind.
        ({"r1": [80, 82, 78], "r4": [81, 80, 80]}, True, "not supported", 4),
        # multi-class: within noise but 7 points behind.
        ({"r1": [70, 81, 68], "r12": [80, 80, 80]}, True, "inconclusive", 12),
        # one seed: nothing to test, whatever the means.
        ({"r1": [60], "r12": [80]}, True, "inconclusive", 12),
        ({"r1": [80], "r12": [60]}, False, "inconclusive", 1),
        # no rank 1.
        ({"r4": [80, 81], "r12": [80, 82]}, False, "inconclusive", None),
    ],
)
def test_rank_verdict_on_synthetic_sweeps(ranks, multiclass, verdict, best):
    v = paper_claims.rank_verdict(_by_rank(**ranks), multiclass=multiclass, margin=2.0)
    assert v["verdict"] == verdict, v["reason"]
    assert v["best_rank"] == best


def test_rank_verdict_statistic_by_hand_and_pairs_only_shared_seeds():
    v = paper_claims.rank_verdict(
        _by_rank(r1=[70, 69, 71], r12=[80, 80, 80]), multiclass=True, margin=2.0
    )
    # d = [-10, -11, -9]: mean -10, sd 1, t = -10 / (1 / sqrt 3); t_0.975 at 2 df = 4.303.
    assert v["gap"] == pytest.approx(10.0)
    assert v["t"] == pytest.approx(-10 * np.sqrt(3))
    assert v["n"] == 3 and v["t_crit"] == pytest.approx(T975_DF2, rel=1e-9)
    # Rank 12 ran seeds 13 and 21 only: the pairs are those two seeds; the best is by mean.
    by_rank = _by_rank(r1=[70, 72, 99], r12=[80, 81])
    v = paper_claims.rank_verdict(by_rank, multiclass=True, margin=2.0)
    assert v["n"] == 2 and v["gap"] == pytest.approx(9.5)  # d = [-10, -9]
    assert v["t"] == pytest.approx(-9.5 / (np.std([-10, -9], ddof=1) / np.sqrt(2)))
    assert v["verdict"] == "supported"  # t = -19 < -12.706 (1 df)
    # Rank 1 best: the statistic is against the best rank above 1 (r = 4, not r = 12).
    v = paper_claims.rank_verdict(
        _by_rank(r1=[81, 80, 82], r4=[80, 80, 81], r12=[70, 70, 70]), multiclass=False, margin=0
    )
    assert (v["best_rank"], v["rival"], v["verdict"]) == (1, 4, "supported")
    assert v["gap"] == pytest.approx(-2 / 3)  # d = [1, 0, 1]
    assert v["t"] == pytest.approx((2 / 3) / (np.std([1, 0, 1], ddof=1) / np.sqrt(3)))
    # A larger margin turns "within noise but behind" into supported.
    wide = _by_rank(r1=[70, 81, 68], r12=[80, 80, 80])
    assert paper_claims.rank_verdict(wide, multiclass=False, margin=8.0)["verdict"] == "supported"


def test_rank_verdict_degenerate_spreads():
    # Identical pairs: t = 0, no gap, rank 1 counts as best (binary supported, multi-class not).
    same = _by_rank(r1=[80, 70, 75], r4=[80, 70, 75])
    v = paper_claims.rank_verdict(same, multiclass=False, margin=0.0)
    assert (v["t"], v["gap"], v["best_rank"], v["verdict"]) == (0.0, 0.0, 1, "supported")
    assert paper_claims.rank_verdict(same, multiclass=True, margin=0.0)["verdict"] == (
        "not supported"
    )
    # Always 10 points less, however the floats round: t = -inf, significantly worse.
    shifted = {1: {13: 0.7, 21: 0.6, 42: 0.9}, 4: {13: 0.8, 21: 0.7, 42: 1.0}}
    v = paper_claims.rank_verdict(shifted, multiclass=True, margin=2.0)
    assert v["t"] == -np.inf and v["gap"] == pytest.approx(10.0) and v["verdict"] == "supported"
    v = paper_claims.rank_verdict(_by_rank(r1=[70], r4=[80]), multiclass=True, margin=2.0)
    assert np.isnan(v["t"]) and np.isnan(v["t_crit"]) and v["verdict"] == "inconclusive"


@pytest.mark.parametrize(
    "x, verdict",
    [
        (2.48, "supported"),  # t = -2.48 sqrt 3 = -4.2955 > -4.3027: within noise, 2.48 <= 3
        (2.49, "not supported"),  # t = -2.49 sqrt 3 = -4.3128 < -4.3027: significantly worse
    ],
)
def test_rank_verdict_threshold_is_the_t_quantile_at_2_df(x, verdict):
    # d = (-x - 1, -x, -x + 1) points: mean -x, sd 1, t = -x sqrt 3 (n = 3, df = 2).
    r1 = [80 - x - 1, 80 - x, 80 - x + 1]
    v = paper_claims.rank_verdict(_by_rank(r1=r1, r4=[80, 80, 80]), multiclass=False, margin=3)
    assert v["t"] == pytest.approx(-x * np.sqrt(3), rel=1e-9)
    assert v["t_crit"] == pytest.approx(T975_DF2, rel=1e-9)
    assert v["verdict"] == verdict, v["reason"]


@pytest.mark.parametrize("x, worse", [(6.35, False), (6.36, True)])
def test_rank_verdict_threshold_is_the_t_quantile_at_1_df(x, worse):
    # d = (-x - 0.5, -x + 0.5) points: mean -x, sd 1 / sqrt 2, t = -2x (df = 1: 12.706).
    r1 = [80 - x - 0.5, 80 - x + 0.5]
    v = paper_claims.rank_verdict(_by_rank(r1=r1, r12=[80, 80]), multiclass=True, margin=2.0)
    assert v["t"] == pytest.approx(-2 * x, rel=1e-9)
    assert v["t_crit"] == pytest.approx(T975_DF1, rel=1e-9)
    assert v["verdict"] == ("supported" if worse else "inconclusive"), v["reason"]


def test_combine_and_bound_verdict():
    s, n, i = "supported", "not supported", "inconclusive"
    assert paper_claims.combine([s, s]) == s
    assert paper_claims.combine([s, i]) == i
    assert paper_claims.combine([i, n, s]) == n
    assert paper_claims.combine([]) == i
    bound = paper_claims.bound_verdict
    assert bound({"mr": (2, 1), "trec": (6, 4)}) == s
    assert bound({"mr": (2, 2), "trec": (6, 1)}) == n
    assert bound({"mr": (2, 1), "trec": (6, 1)}) == i


def _records(task, ranks):
    return [
        {"task": task, "method": "lora", "rank": r, "seed": s, "test_accuracy": a / 100}
        for r, accs in ranks.items()
        for s, a in zip((13, 21, 42), accs, strict=True)
    ]


def test_sweep_verdicts_read_the_kind_of_task_from_the_registry():
    # MR (2 label words): rank 1 within noise of the best; TREC (6): rank 1 far below.
    records = _records("mr", {1: [80, 82, 78], 4: [81, 80, 80]})
    records += _records("trec", {1: [50, 52, 51], 4: [70, 72, 69], 12: [75, 74, 78]})
    records.append({"task": "mr", "method": "zero_shot", "rank": None, "seed": 13,
                    "test_accuracy": 0.9})  # fmt: skip
    verdict, lines = paper_claims.sweep_verdicts(records, margin=2.0)
    assert verdict == "supported"
    assert lines[0].startswith("- mr (K = 2, binary): best rank 4;")
    assert lines[1].startswith("- trec (K = 6, multi-class): best rank 12;")
    # Swap the tasks' numbers: MR's rank 1 is now far behind -> not supported.
    swapped = _records("mr", {1: [50, 52, 51], 4: [70, 72, 69]})
    swapped += _records("trec", {1: [80, 82, 78], 4: [81, 80, 80]})
    assert paper_claims.sweep_verdicts(swapped, margin=2.0)[0] == "not supported"


def test_claims_config_refuses_sweeps_without_rank_one_or_off_the_bound():
    with pytest.raises(SystemExit):
        paper_claims.parse_args(["--sweep-ranks", "4", "12"])
    with pytest.raises(ConfigError, match="not in --bv-ranks"):
        paper_claims.ClaimsConfig(sweep_ranks=(1, 32))
    assert paper_claims.ClaimsConfig(sweep_ranks=(1, 32), sweep=False).sweep_ranks == (1, 32)
    cfg = paper_claims.parse_args(["--sweep-ranks", "1", "2", "--sweep-margin", "1.5"])
    assert cfg.sweep_ranks == (1, 2) and cfg.sweep_margin == 1.5


# --- measured test errors beside the bound (experiments.bias_variance) -----------------------


def _bound(task="trec"):
    # The bound's sum is lowest at r = 2 over (1, 2, 4, 8), and at r = 4 over (1, 4).
    return {"task": task, "K": 6, "N": 24, "matrices": 2, "ranks": [1, 2, 4, 8],
            "fit": [0.9, 0.5, 0.4, 0.35], "complexity": [0.1, 0.2, 0.3, 0.5],
            "total": [1.0, 0.7, 0.7001, 0.85], "best_rank": 2, "confidence_term": 0.3,
            "fit_drop_1_to_max": 0.55}  # fmt: skip


def test_compare_measured_and_bound_minima():
    measured = {1: [0.3, 0.32, 0.28], 4: [0.2, 0.25, 0.21], 12: [0.21, 0.22, 0.2]}
    cmp = bias_variance.compare(_bound(), measured)
    assert cmp["measured"][4] == pytest.approx([0.22, np.std([0.2, 0.25, 0.21], ddof=1), 3])
    assert cmp["measured_best_rank"] == 12  # 0.21 < 0.22
    assert cmp["common_ranks"] == [1, 4]
    assert cmp["bound_best_rank"] == 2 and cmp["bound_best_rank_on_measured"] == 4
    assert cmp["agree"]  # over ranks 1 and 4 both are lowest at 4
    cmp = bias_variance.compare(_bound(), {1: [0.1], 4: [0.2]})
    assert cmp["measured_best_rank"] == 1 and not cmp["agree"]


def test_bias_variance_markdown_and_plot_show_the_measured_errors(tmp_path):
    errors = {"trec": {1: [0.3, 0.32, 0.28], 4: [0.2, 0.25, 0.21]}}
    text = bias_variance.markdown([_bound()], errors, "runs/x/results.jsonl")
    assert "| 4 | 0.4000 | 0.3000 | 0.7001 | 22.0 ± 2.6 (3) |" in text
    assert "| 2 | 0.5000 | 0.2000 | 0.7000 |  |" in text
    assert "Measured test error is lowest at r = 4 (22.0 ± 2.6%, 3 seeds)" in text
    assert "the two minima agree" in text and "`runs/x/results.jsonl`" in text
    png = bias_variance.plot([_bound()], errors, str(tmp_path / "bv.png"))
    assert (tmp_path / "bv.png").stat().st_size > 0 and png.endswith("bv.png")


def test_finetune_errors_reads_lora_cells_and_refuses_a_mismatch(tmp_path):
    path = tmp_path / "results.jsonl"
    records = _records("trec", {1: [50, 52, 51], 12: [70, 72, 69]})
    records.append({"task": "trec", "method": "head", "rank": None, "seed": 13,
                    "test_accuracy": 0.9})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = bias_variance.finetune_errors(str(path), ("trec",), (1, 2))
    assert errors["trec"][12] == pytest.approx([0.30, 0.28, 0.31])
    assert set(errors["trec"]) == {1, 12}
    assert bias_variance.finetune_errors(None, ("trec",)) == {}
    with pytest.raises(MissingFileError, match="no such file"):
        bias_variance.finetune_errors(str(tmp_path / "none.jsonl"), ("trec",))
    with pytest.raises(ConfigError, match="no LoRA cells of task 'mr'"):
        bias_variance.finetune_errors(str(path), ("trec", "mr"))
    with pytest.raises(ConfigError, match="none among --ranks"):
        bias_variance.finetune_errors(str(path), ("trec",), (2, 4))
    both = tmp_path / "both.jsonl"  # a several-encoder run's records: one encoder's file, fix
    both.write_text("".join(json.dumps({**r, "model": m}) + "\n" for m in "ab" for r in records))
    with pytest.raises(ConfigError, match=r"several encoders \(\['a', 'b'\]\)"):
        bias_variance.finetune_errors(str(both), ("trec",))
    # The command says so in one line, before any Jacobian is computed.
    with pytest.raises(SystemExit, match="error: --finetune-results .* no LoRA cells"):
        bias_variance.main(["--tasks", "mr", "--finetune-results", str(path), "--out",
                            str(tmp_path)])  # fmt: skip


def test_paper_claims_feeds_the_sweep_to_bias_variance_and_writes_every_section(
    tmp_path, monkeypatch
):
    seen = {}

    def section(name, verdict="supported", plot=None):
        return {"title": name, "claim": f"claim {name}", "command": f"cmd {name}",
                "numbers": f"numbers {name}", "plot": plot, "verdict": verdict}  # fmt: skip

    def bv(cfg, results_path):
        seen["results"] = results_path
        return section("bv", "inconclusive", str(tmp_path / "claims" / "bias_variance" / "p.png"))

    monkeypatch.setattr(paper_claims, "claim_thresholds", lambda cfg: section("thr"))
    monkeypatch.setattr(paper_claims, "claim_cstar", lambda cfg: section("cstar", "not supported"))
    monkeypatch.setattr(paper_claims, "claim_pl", lambda cfg, cache: section("pl"))
    monkeypatch.setattr(paper_claims, "claim_sweep", lambda cfg: (section("sweep"), "r.jsonl"))
    monkeypatch.setattr(paper_claims, "claim_bias_variance", bv)
    path = paper_claims.run(paper_claims.ClaimsConfig(name="claims", out=str(tmp_path)))
    assert seen["results"] == "r.jsonl"
    text = open(path).read()
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## thr", "## cstar", "## pl", "## bv", "## sweep"]
    assert "- cstar: **not supported**" in text and "**Verdict: inconclusive.**" in text
    assert "![bv](bias_variance/p.png)" in text and "**Command.** `cmd sweep`" in text
    timings = json.loads((tmp_path / "claims" / "timings.json").read_text())
    assert set(timings) == {"thresholds", "cstar", "pl", "rank_sweep", "bias_variance"}
    paper_claims.run(paper_claims.ClaimsConfig(name="claims", out=str(tmp_path), sweep=False))
    assert seen["results"] is None
    assert "Not run in this report (--no-sweep)." in open(path).read()
