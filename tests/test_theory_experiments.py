"""experiments.cstar / pl / bias_variance / paper_claims entry points, on tiny sizes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import bias_variance, cstar, landscape, paper_claims, pl
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
def test_pl_and_bias_variance_run_on_a_tiny_model(tiny_roberta, tmp_path, monkeypatch):
    common = {"model": tiny_roberta, "k": 2, "max_length": 16, "out": str(tmp_path)}
    pcfg = pl.PLConfig(
        task="mr",
        seeds=(13, 21),
        max_steps=5,
        mse_steps=5,
        lm_iters=3,
        layers=(),
        kernel_points=3,
        below_k=16,
        below_layers=(0,),
        below_ce_steps=4,
        **common,
    )  # fmt: skip
    # Stopped during the second seed (GD runs: seed 13's cross-entropy and squared-error
    # control, then seed 21's cross-entropy), the run goes on from there.
    losses, gd = [], pl._gd

    def stopped_at_the_third_run(*args, **kwargs):
        losses.append(args[3])
        if len(losses) == 3 and len(args) > 7:
            raise KeyboardInterrupt
        return gd(*args, **kwargs)

    monkeypatch.setattr(pl, "_gd", stopped_at_the_third_run)
    with pytest.raises(KeyboardInterrupt):
        pl.run(pcfg)
    partial_path = tmp_path / pcfg.name / "pl.partial.json"
    partial = json.loads(partial_path.read_text())
    assert [r["seed"] for r in partial["seeds"]] == [13] and "mse" in partial
    losses.clear()
    res = pl.run(pcfg)
    # Seed 21's run and the below-threshold control's; seed 13 and its controls came back
    # (from the start it would be ce, mse, ce, ce).
    assert losses == ["ce", "ce"]
    assert res["seeds"][0] == partial["seeds"][0] and res["mse"] == partial["mse"]
    assert not partial_path.exists()
    for r in res["seeds"]:  # the kernel at steps 0, 1 and 5 (log-spaced), lam_min <= lam_max
        assert [row["step"] for row in r["kernel"]] == [0, 1, 5]
        assert all(0 <= row["lam_min"] <= row["lam_max"] for row in r["kernel"])
    below = res["below"]  # one 32 x 32 query kernel: dim(r) = 64 r - r^2 against KN = 64
    assert [(m["rank"], m["dim"], m["kn"]) for m in below["lm"]] == [(1, 63, 64), (2, 124, 64)]
    assert below["ce"]["steps"] == 4 and below["ce"]["dim"] == 63
    assert res["regimes"] == [res["mse_lm"], *below["lm"]]
    lm = res["mse_lm"]
    assert len(lm["loss"]) == 4 and lm["loss_end"] <= lm["loss_start"] and lm["kn"] == 8
    assert [r["seed"] for r in res["seeds"]] == [13, 21]
    for r in res["seeds"] + [res["mse"]]:
        assert r["steps"] == 5 and r["loss_end"] < r["loss_start"]
    assert "| 13 | " in pl.markdown(res) and "Squared-error control" in pl.markdown(res)
    assert "by Levenberg-Marquardt (seed 13" in pl.markdown(res)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records("mr", {1: [60, 62, 58]})))
    bcfg = bias_variance.BiasVarianceConfig(
        tasks=("mr",), ranks=(1, 2), steps=3, draws=4, layers=(), **common
    )
    out = bias_variance.run(bcfg)
    (task,) = out["tasks"]
    # The bound's terms as the report defines them: total = fit + complexity, best rank = its
    # argmin, the bound = total + the confidence term (this replaces a check that could not fail:
    # best_rank in (1, 2) with ranks (1, 2)).
    assert len(task["fit"]) == len(task["complexity"]) == 2
    total = np.add(task["fit"], task["complexity"])
    np.testing.assert_allclose(task["total"], total, rtol=1e-12)
    assert task["best_rank"] == (1, 2)[int(np.argmin(total))]
    assert task["bound_min"] == pytest.approx(total.min() + task["confidence_term"])
    assert all(c > 0 for c in task["complexity"])  # trained budgets are nonzero norms
    # The union bound: budgets on the grid (never below the trained norms), delta shared over
    # 40 grid points per adapted matrix and the 2 ranks.
    for path, norms in task["budgets"].items():
        assert all(g >= b for g, b in zip(task["budgets_grid"][path], norms, strict=True))
    assert task["union_count"] == 40 ** task["matrices"] * 2
    assert all(u >= t for u, t in zip(task["bound_union"], total, strict=True))
    saved = json.loads((tmp_path / "bias_variance" / "bias_variance.json").read_text())
    assert saved["tasks"][0]["ranks"] == [1, 2] and out["comparison"] == {}
    # The same curves (resumed, not recomputed) with measured errors beside them.
    again = bias_variance.run(dataclasses.replace(bcfg, finetune_results=str(results)))
    assert again["tasks"] == out["tasks"]
    assert again["comparison"]["mr"]["measured"][1][0] == pytest.approx(0.4)
    assert "| 1 | " in again["markdown"] and "40.0 ± 2.0 (3) |" in again["markdown"]


@pytest.mark.slow
def test_landscape_runs_on_a_tiny_model(tiny_roberta, tmp_path):
    cfg = landscape.LandscapeConfig(
        model=tiny_roberta, k=2, max_length=16, layers=(0,), starts=2, lm_iters=30,
        lanczos_iters=8, out=str(tmp_path),
    )  # fmt: skip
    res = landscape.run(cfg)
    # query and value of layer 0 of a hidden-32 model at r = 1: dim 2 (64 - 1), KN = 4 x 2
    assert res["dim"] == 126 and res["kn"] == 8 and len(res["gram"]["eigvals"]) == 8
    assert sum(res["counts"].values()) == 2 and len(res["points"]) == 2
    for p in res["points"]:
        assert p["loss"] <= p["loss_start"] and p["lam_min"] <= p["lam_max"]
    assert "| 0 | " in landscape.markdown(res) and "condition number" in landscape.markdown(res)
    assert landscape.run(cfg) == json.loads(json.dumps(res))  # resumed from landscape.json


def test_bias_variance_verdicts_per_task():
    mr = {"task": "mr", "K": 2, "ranks": [1, 16], "fit_drop_1_to_max": 0.002,
          "bound_min": 0.8, "best_rank": 1}  # fmt: skip
    trec = {"task": "trec", "K": 6, "ranks": [1, 16], "fit_drop_1_to_max": 0.4,
            "bound_min": 0.9, "best_rank": 4}  # fmt: skip
    verdict, lines = paper_claims.bias_variance_verdicts([mr, trec], saturation=0.01)
    assert verdict == "supported"
    assert lines[0].startswith("- mr (K = 2): training loss falls by 0.0020 nats")
    assert "(saturated)" in lines[0] and "(not saturated)" in lines[1]
    vacuous = {**trec, "bound_min": 18.0}
    verdict, lines = paper_claims.bias_variance_verdicts([mr, vacuous], saturation=0.01)
    assert verdict == "inconclusive" and "vacuous, 18 x the loss range" in lines[1]
    flat = {**trec, "fit_drop_1_to_max": 0.001}
    assert paper_claims.bias_variance_verdicts([mr, flat], saturation=0.01)[0] == "not supported"
    # With the union bound present, it is the one judged (here vacuous: inconclusive).
    union = {**mr, "bound_union_min": 3.5, "best_rank_union": 1}
    verdict, lines = paper_claims.bias_variance_verdicts([union, trec], saturation=0.01)
    assert verdict == "inconclusive" and "union bound at least 3.5 nats (vacuous" in lines[0]


def _records(task, ranks):
    return [
        {"task": task, "method": "lora", "rank": r, "seed": s, "test_accuracy": a / 100}
        for r, accs in ranks.items()
        for s, a in zip((13, 21, 42), accs, strict=True)
    ]


def test_sweep_verdicts_read_the_kind_of_task_from_the_registry():
    # MR (2 label words): r = 1 within 1 point of r = 12 (d = -1, 0, 1: equivalent within 2);
    # TREC (6): a rise of about 25 points. r = 4 is not the comparison, however good.
    records = _records("mr", {1: [79, 80, 81], 4: [95, 95, 95], 12: [80, 80, 80]})
    records += _records("trec", {1: [50, 52, 51], 4: [70, 72, 69], 12: [75, 74, 78]})
    records.append({"task": "mr", "method": "zero_shot", "rank": None, "seed": 13,
                    "test_accuracy": 0.9})  # fmt: skip
    verdict, lines = paper_claims.sweep_verdicts(records, margin=2.0, compare_rank=12)
    assert verdict == "supported"
    assert lines[0].startswith("- mr (K = 2, binary): r = 1 minus r = 12 +0.0 points over 3")
    assert lines[1].startswith("- trec (K = 6, multi-class): r = 1 minus r = 12 -24.7 points")
    # Swap the tasks' numbers: MR's rank 1 is now far behind -> not supported.
    swapped = _records("mr", {1: [50, 52, 51], 12: [70, 72, 69]})
    swapped += _records("trec", {1: [79, 80, 81], 12: [80, 80, 80]})
    assert paper_claims.sweep_verdicts(swapped, margin=2.0)[0] == "not supported"


def test_trec3_is_three_of_trecs_classes_and_its_sweep_verdict_is_multiclass():
    from lora_jax import tasks
    from lora_jax.tasks.registry import TREC_COARSE, load_trec

    cfg = paper_claims.ClaimsConfig()
    named = tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=16)
    assert list(named) == ["mr", "subjrt", "boolq", "trec", "trec3"]
    trec3, trec = named["trec3"], load_trec()
    assert trec3.label_words == ("Human", "Location", "Number")
    data = trec3.load()
    for split, mine in (("train", data.train), ("test", data.test)):
        full = getattr(trec, split)
        keep = np.isin(full.labels, [TREC_COARSE.index(c) for c in ("HUM", "LOC", "NUM")])
        assert mine.texts[0] == tuple(np.asarray(full.texts[0], dtype=object)[keep])
        assert np.bincount(mine.labels).tolist() == np.bincount(full.labels[keep])[
            [3, 4, 5]].tolist()  # fmt: skip
    # K comes from the task file: trec3 is judged as multi-class (a rise is needed).
    records = _records("trec3", {1: [60, 61, 59], 12: [60, 61, 60]})
    verdict, lines = paper_claims.sweep_verdicts(records, 2.0, 12, {"trec3": 3})
    assert verdict == "not supported" and lines[0].startswith("- trec3 (K = 3, multi-class)")


def test_bias_variance_like_the_sweep_takes_its_layers_k_and_seed():
    default = paper_claims.bias_variance_config(paper_claims.parse_args([]), "r.jsonl")
    assert (default.k, default.layers, default.seed, default.finetune_results) == (
        16, (), 13, "r.jsonl"
    )  # fmt: skip
    cfg = paper_claims.parse_args(["--sweep-seeds", "21", "42"])
    assert paper_claims.bias_variance_config(cfg, None).seed == 21
    small = paper_claims.bias_variance_config(paper_claims.parse_args(["--no-bv-like-sweep"]), None)
    assert (small.k, small.layers, small.seed) == (4, (5,), 13)


def test_claims_config_refuses_sweeps_without_rank_one_or_off_the_bound():
    with pytest.raises(SystemExit):
        paper_claims.parse_args(["--sweep-ranks", "4", "12"])
    with pytest.raises(ConfigError, match="compare rank"):
        paper_claims.ClaimsConfig(sweep_ranks=(1, 4))
    with pytest.raises(ConfigError, match="sweep-margin > 0"):
        paper_claims.ClaimsConfig(sweep_margin=0.0)
    with pytest.raises(ConfigError, match=r"--bv-tasks \['trec'\] are not in --tasks"):
        paper_claims.ClaimsConfig(tasks=("mr",))
    with pytest.raises(ConfigError, match="not in --bv-ranks"):
        paper_claims.ClaimsConfig(sweep_ranks=(1, 12, 32))
    assert paper_claims.ClaimsConfig(sweep_ranks=(1, 12, 32), sweep=False).sweep_ranks[-1] == 32
    cfg = paper_claims.parse_args(
        ["--sweep-ranks", "1", "2", "--sweep-compare-rank", "2", "--sweep-margin", "1.5"]
    )
    assert cfg.sweep_ranks == (1, 2) and cfg.sweep_margin == 1.5 and cfg.sweep_compare_rank == 2


# --- measured test errors beside the bound (experiments.bias_variance) -----------------------


def _bound(task="trec"):
    # The bound's sum is lowest at r = 2 over (1, 2, 4, 8), and at r = 4 over (1, 4).
    return {"task": task, "K": 6, "N": 24, "matrices": 2, "ranks": [1, 2, 4, 8],
            "fit": [0.9, 0.5, 0.4, 0.35], "complexity": [0.1, 0.2, 0.3, 0.5],
            "total": [1.0, 0.7, 0.7001, 0.85], "best_rank": 2, "confidence_term": 0.3,
            "bound_min": 1.0, "vacuous_by": 1.0, "fit_drop_1_to_max": 0.55}  # fmt: skip


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

    def thr(cfg, c_interval):
        seen["c_interval"] = c_interval
        return section("thr")

    def cs(cfg):
        return {**section("cstar", "not supported"), "c_interval": (1.2, 1.6)}

    monkeypatch.setattr(paper_claims, "claim_thresholds", thr)
    monkeypatch.setattr(paper_claims, "claim_cstar", cs)
    monkeypatch.setattr(paper_claims, "claim_pl", lambda cfg, cache: section("pl"))
    reused = {**section("land"), "seconds": 900.0}  # computed earlier, reused in no time
    monkeypatch.setattr(paper_claims, "claim_landscape", lambda cfg: reused)
    monkeypatch.setattr(paper_claims, "claim_lazy", lambda cfg: section("lazy"))
    monkeypatch.setattr(paper_claims, "claim_sweep", lambda cfg: (section("sweep"), "r.jsonl"))
    monkeypatch.setattr(paper_claims, "claim_bias_variance", bv)
    path = paper_claims.run(paper_claims.ClaimsConfig(name="claims", out=str(tmp_path)))
    assert seen["results"] == "r.jsonl" and seen["c_interval"] == (1.2, 1.6)
    text = open(path).read()
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## lazy", "## thr", "## cstar", "## land", "## pl", "## bv", "## sweep"]
    assert "- cstar: **not supported**" in text and "**Verdict: inconclusive.**" in text
    assert "![bv](bias_variance/p.png)" in text and "**Command.** `cmd sweep`" in text
    assert text.count("(its saved results were reused)") == 1  # land only: no record of seconds
    land = text[text.index("## land") : text.index("## pl")]
    assert "in this run: 0 s (its saved results were reused)." in land
    timings = json.loads((tmp_path / "claims" / "timings.json").read_text())
    assert set(timings) == {"lazy", "thresholds", "cstar", "landscape", "pl", "rank_sweep",
                            "bias_variance"}  # fmt: skip
    paper_claims.run(paper_claims.ClaimsConfig(name="claims", out=str(tmp_path), sweep=False))
    assert seen["results"] is None
    assert "Not run in this report (--no-sweep)." in open(path).read()


# --- claim 1: the constant and the rank-1 conclusion -------------------------------------------


def _row(shape, solver, budget, tol, rho50, low, high):
    return {"shape": shape, "solver": solver, "budget": budget, "tol": tol, "rho50": rho50,
            "low": low, "high": high, "linear_bound": 1.5, "censored": "", "dim": 31,
            "diverged": 0.0}  # fmt: skip


def test_cstar_conclusion_separates_gd_from_the_capacity_point():
    nan = float("nan")
    rows = [
        _row("16x16x1", "gd", 2500, 1e-4, 1.6, 1.5, 1.7),
        _row("16x16x1", "gd", 20000, 1e-4, 1.3, 1.2, 1.4),  # the longest budget: the estimand
        _row("16x16x1", "gd", 20000, 1e-6, 1.5, 1.4, 1.6),
        _row("16x16x1", "lm", 300, 1e-6, 1.01, 0.98, 1.05),  # capacity: strict tol, LM
        _row("16x16x1", "lm", 300, 1e-4, 0.95, 0.9, 1.0),
        _row("8x8x2", "gd", 20000, 1e-4, 1.45, 1.3, nan),  # no upper bound
        _row("8x8x2", "adam", 100, 1e-6, 1.1, 1.0, 1.2),
    ]
    conc = cstar.conclusion(rows, 1e-4)
    a, b = conc["shapes"]["16x16x1"], conc["shapes"]["8x8x2"]
    assert (a["gd_constant"], a["gd_ci"], a["gd_budget"]) == (1.3, [1.2, 1.4], 20000)
    assert a["gd"] == {2500: 1.6, 20000: 1.3}
    assert (a["capacity"], a["capacity_ci"], a["capacity_solver"]) == (1.01, [0.98, 1.05], "lm 300")
    assert b["capacity_solver"] == "adam 100" and np.isnan(b["gd_ci"][1])
    assert conc["gd_range"] == [1.3, 1.45] and conc["capacity_range"] == [1.01, 1.1]
    # The interval for the rank-1 conclusion: from GD's limit as its budget grows (below) to
    # its longest budget's point (above); undefined on a side where one shape's is.
    low, high = paper_claims.c_star_interval(conc)
    assert np.isnan(low) and np.isnan(high)  # no limits measured; 8x8x2 has no upper bound
    lim = lambda lo, hi: {"value": (lo + hi) / 2, "low": lo, "high": hi}  # noqa: E731
    a["gd_limit"], b["gd_limit"] = lim(1.1, 1.25), lim(1.15, 1.3)
    b["gd_ci"] = [1.3, 1.9]
    assert paper_claims.c_star_interval(conc) == (1.1, 1.9)
    b["gd_limit"] = lim(nan, 1.3)
    assert np.isnan(paper_claims.c_star_interval(conc)[0])
    assert paper_claims.c_star_interval({"shapes": {}}) is None
    # The paper's constant is checked against the limits, per shape and over sizes.
    conc["finite_size"] = [{"quantity": "GD at 20000 steps", "rank": 1, "aspect": 1.0,
                            "model": "a / d", "limit": lim(2.0, 3.0)},
                           {"quantity": "GD limit (budget -> inf)", "rank": 1, "aspect": 1.0,
                            "model": "a d^-b", "limit": lim(nan, nan)},
                           {"quantity": "GD limit (budget -> inf)", "rank": 1, "aspect": 1.0,
                            "model": "a / d", "limit": lim(1.0, 1.2)}]  # fmt: skip
    got = paper_claims.constant_intervals(conc)
    assert list(got) == ["16x16x1", "8x8x2", "d -> inf (r = 1, m/n = 1)"]
    assert got["16x16x1"] == (1.1, 1.25) and got["d -> inf (r = 1, m/n = 1)"] == (1.0, 1.2)
    assert np.isnan(got["8x8x2"][0]) and got["8x8x2"][1] == 1.3
    del a["gd_limit"]
    assert paper_claims.constant_intervals(conc)["16x16x1"] is None


def test_rank_one_lines_use_the_paper_case():
    records = [
        {"model": "roberta-large", "KN": 64, "matrices": 48, "shapes": [[1024, 1024]]},
        {"model": "minilm", "KN": 576, "matrices": 12, "shapes": [[384, 384]]},
    ]
    out, lines = paper_claims.rank_one_lines(records, (1.2, 1.6))
    assert out["c_max"] == pytest.approx(2047 / 64) and out["verdict"] == "supported"
    assert lines[1] == (
        "- minilm, KN = 576: rank 1 passes for any C* below 1.33 (one 384x384 matrix), "
        "16.0 (all 12 summed)."
    )
    assert paper_claims.rank_one_lines(records, (40.0, 50.0))[0]["verdict"] == "not supported"
    assert paper_claims.rank_one_lines(records, None)[0]["verdict"] == "inconclusive"


def test_pl_seed_numbers_after_the_detected_plateau():
    # log 2 for 200 steps, then log 2 / (1 + (t - 200) / 2); ||grad L|| = 0.8 L after the
    # plateau (the Lojasiewicz form with c = 0.8) and 0.01 on it (a slow escape, not a saddle).
    t = np.arange(3001.0)
    loss = np.where(t < 200, np.log(2), np.log(2) / (1 + 0.5 * np.maximum(t - 200, 0)))
    grad = np.where(t < 200, 0.01, 0.8 * loss)
    out = pl.seed_numbers(loss, grad**2, target=1e-3)
    assert 200 <= out["plateau_end"] <= 205 and out["steps"] == 3000
    assert out["exponent"] == pytest.approx(1.0, abs=1e-9)
    assert out["c_min"] == pytest.approx(0.8) and out["c_end"] == pytest.approx(0.8)
    assert out["reached"] and not out["stalled"]  # log 2 / 1401 = 4.9e-4
    assert pl.seed_numbers(loss, grad**2, target=float(loss[-1]))["reached"]  # "at most"
    # Measured from the start instead, the plateau's tiny gradients would give c_min = 0.014.
    assert np.min(grad / loss) == pytest.approx(0.01 / np.log(2))
