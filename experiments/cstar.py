"""C* by simulation: ``python -m experiments.cstar [--shapes 16x16x1 ...] [--draws 64] ...``.

For each (m, n, r) and each solver, solves ``draws`` random Gaussian-iid rank-r sensing problems
at each KN of a rho grid (:mod:`ntk.theory.cstar`), then reports the 50% transition rho_50 with a
bootstrap 95% interval per (shape, solver, budget, success threshold), next to the paper's 1.35
and to the two bounds on the capacity constant (1 below; ``dim / (r max(m, n))`` above, where
the problem becomes linear in one factor). Writes ``runs/<name>/points.jsonl`` (one line per
(shape, solver, KN): resumes), ``report.md`` and ``plots/cstar.png``.

The paper's constant is gradient descent's transition (GD reaching zero loss), read at each of
GD's budgets and extrapolated to an infinite budget (:func:`budget_limits`, 50% and 95%
points); shapes of one rank and aspect ratio give its finite-size scaling (:func:`finite_size`).
The capacity point is what the strongest solver (Levenberg-Marquardt) reports at a strict
threshold (below rho = 1 generic targets have no exact solution, so a strong solver lands near
the dimension count). The excess of GD over it, shrinking as its budget grows, is an
optimization effect. :func:`conclusion` reports both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from ntk.theory import cstar, scaling
from ntk.theory.thresholds import PAPER_C_STAR

#: Solver -> (budgets, step size / initial damping).
SOLVERS = {
    "gd": ((2500, 5000, 20000), 0.2),
    "adam": ((20000,), 1e-2),
    "lm": ((50, 300), 1e-2),
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """``'16x16x1'`` -> (m, n, r)."""
    try:
        m, n, r = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} must be MxNxR, e.g. 16x16x1.") from None
    if not 1 <= r <= min(m, n):
        raise ValueError(f"shape {text!r}: need 1 <= r <= min(m, n).")
    return m, n, r


@dataclasses.dataclass(frozen=True, kw_only=True)
class CStarConfig:
    """One C* simulation study.

    Attributes:
      name: run directory name under ``out``.
      shapes: ``MxNxR`` strings (three or more of one rank and aspect ratio, as 8, 16 and 32
        square at r = 1, give the finite-size scaling).
      solvers: any of ``gd`` (``gd_budgets``, lr 0.2), ``adam`` (20k steps, lr
        1e-2 cosine-decayed), ``lm`` (Levenberg-Marquardt, 50 / 300 iterations).
      rhos: the rho grid (each becomes KN = round(dim / rho)).
      draws: random problems per point.
      tols: success thresholds on L_end / L_start; ``tol`` is the headline one.
      tol: the headline threshold.
      seed: seed of the draws.
      restart_iters: Levenberg-Marquardt iterations from each end point of gradient descent's
        longest budget, to tell its failures apart (slow convergence or stuck; 0: not run).
      gd_budgets: the step counts GD's loss is read at (one trajectory); its 50% and 95%
        points over them are extrapolated to an infinite budget (:mod:`ntk.theory.scaling`).
      n_boot: bootstrap resamples for every interval.
      out: parent directory of run directories.
    """

    name: str = "cstar"
    shapes: tuple[str, ...] = ("8x8x1", "16x16x1", "32x32x1", "32x8x1", "16x16x2", "12x12x3")
    solvers: tuple[str, ...] = ("gd", "adam", "lm")
    rhos: tuple[float, ...] = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.45, 1.65, 1.9)
    draws: int = 64
    tols: tuple[float, ...] = (1e-2, 1e-4, 1e-6)
    tol: float = 1e-4
    seed: int = 0
    restart_iters: int = 300
    gd_budgets: tuple[int, ...] = (1250, 2500, 5000, 10000, 20000)
    n_boot: int = 1000
    out: str = "runs"

    def __post_init__(self):
        if self.restart_iters < 0:
            raise ValueError(f"restart_iters must be >= 0; got {self.restart_iters}.")
        for shape in self.shapes:
            parse_shape(shape)
        unknown = [s for s in self.solvers if s not in SOLVERS]
        if unknown:
            raise ValueError(f"unknown solvers {unknown}; expected some of {list(SOLVERS)}.")
        if self.draws < 2 or not self.rhos or min(self.rhos) <= 0:
            raise ValueError(f"need draws >= 2 and positive rhos; got {self.draws}, {self.rhos}.")
        b = self.gd_budgets
        if not b or min(b) < 1 or list(b) != sorted(set(b)):
            raise ValueError(f"gd_budgets must be increasing positive step counts; got {b}.")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1; got {self.n_boot}.")
        if self.tol not in self.tols:
            raise ValueError(f"tol={self.tol} must be one of tols={self.tols}.")


def _key(rec: dict) -> tuple:
    return rec["shape"], rec["solver"], rec["kn"], tuple(rec["budgets"])


def solver_settings(cfg: CStarConfig, solver: str) -> tuple[tuple[int, ...], float]:
    """(budgets, step size / damping) of ``solver`` in this study (GD's budgets from cfg)."""
    budgets, lr = SOLVERS[solver]
    return (cfg.gd_budgets if solver == "gd" else budgets), lr


def run_points(cfg: CStarConfig, run_dir: str, *, progress: bool = True) -> list[dict]:
    """Simulates every missing (shape, solver, KN) point; returns all point records."""
    path = os.path.join(run_dir, "points.jsonl")
    records = read_records(path)
    done = {_key(r) for r in records}
    todo = []
    for shape in cfg.shapes:
        m, n, r = parse_shape(shape)
        kns = cstar.kn_grid(m, n, r, cfg.rhos)
        for solver in cfg.solvers:
            budgets = solver_settings(cfg, solver)[0]
            todo += [(shape, solver, kn, max(kns)) for kn in kns
                     if (shape, solver, kn, budgets) not in done]  # fmt: skip
    for shape, solver, kn, kn_max in tqdm(todo, desc="C* points", disable=not progress):
        m, n, r = parse_shape(shape)
        budgets, lr = solver_settings(cfg, solver)
        start = time.time()
        point = cstar.simulate(
            cfg.seed, m, n, r, kn, solver=solver, draws=cfg.draws, budgets=budgets, lr=lr,
            kn_max=kn_max,
        )  # fmt: skip
        rec = {
            "shape": shape,
            "solver": solver,
            "kn": kn,
            "rho": point.rho,
            "budgets": list(budgets),
            "ratios": point.ratios.T.tolist(),  # [budgets][draws]
            "seconds": time.time() - start,
        }
        records.append(rec)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    keep = {(s, v, solver_settings(cfg, v)[0]) for s in cfg.shapes for v in cfg.solvers}
    return [r for r in records if (r["shape"], r["solver"], tuple(r["budgets"])) in keep]


def run_failures(cfg: CStarConfig, run_dir: str, *, progress: bool = True) -> list[dict]:
    """GD's failures at its longest budget restarted by Levenberg-Marquardt, per (shape, KN)
    (:func:`ntk.theory.cstar.classify_failures`); resumes from ``failures.jsonl``."""
    path = os.path.join(run_dir, "failures.jsonl")
    records = read_records(path)
    budgets, lr = solver_settings(cfg, "gd")
    done = {(r["shape"], r["kn"], r["restart_iters"], r["steps"]) for r in records}
    todo = []
    for shape in cfg.shapes:
        m, n, r = parse_shape(shape)
        kns = cstar.kn_grid(m, n, r, cfg.rhos)
        todo += [(shape, kn, max(kns)) for kn in kns
                 if (shape, kn, cfg.restart_iters, budgets[-1]) not in done]  # fmt: skip
    for shape, kn, kn_max in tqdm(todo, desc="GD failures", disable=not progress):
        m, n, r = parse_shape(shape)
        start = time.time()
        out = cstar.classify_failures(
            cfg.seed, m, n, r, kn, draws=cfg.draws, steps=budgets[-1], lr=lr,
            lm_iters=cfg.restart_iters, kn_max=kn_max,
        )  # fmt: skip
        rec = {"shape": shape, "kn": kn, "rho": out.rho, "steps": budgets[-1],
               "restart_iters": cfg.restart_iters, "gd": out.gd.tolist(),
               "restart": out.restart.tolist(), "seconds": time.time() - start}  # fmt: skip
        records.append(rec)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    keep = set(cfg.shapes)
    return [r for r in records if r["shape"] in keep and r["restart_iters"] == cfg.restart_iters
            and r["steps"] == budgets[-1]]  # fmt: skip


def failures_markdown(records: list[dict], tol: float) -> str:
    """Per shape and rho: GD's draws solved, failed but solved by the restart (slow), and
    failed both ways (stuck: a spurious minimum, or no rank-r solution below rho = 1)."""
    lines = [
        f"Gradient descent's end points at its longest budget, restarted by Levenberg-Marquardt "
        f"(success: L_end / L_start <= {tol:g}):",
        "",
        "| shape | rho | KN | GD solved | slow (restart solves) | stuck (restart fails) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["shape"], r["rho"])):
        c = cstar.failure_counts(np.asarray(r["gd"]), np.asarray(r["restart"]), tol)
        lines.append(f"| {r['shape']} | {r['rho']:.3f} | {r['kn']} | {c['solved']} | "
                     f"{c['slow']} | {c['stuck']} |")  # fmt: skip
    return "\n".join(lines)


def read_records(path: str) -> list[dict]:
    """The records of a ``.jsonl`` file, one per line ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def transitions(records: list[dict], tols: tuple[float, ...], *, n_boot: int = 1000) -> list[dict]:
    """rho_50 with its bootstrap interval per (shape, solver, budget, tol)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["shape"], rec["solver"]), []).append(rec)
    rows = []
    for (shape, solver), recs in groups.items():
        m, n, r = parse_shape(shape)
        recs = sorted(recs, key=lambda x: x["rho"])
        rhos = np.array([x["rho"] for x in recs])
        for b, budget in enumerate(recs[0]["budgets"]):
            ratios = np.array([x["ratios"][b] for x in recs])  # (G, draws)
            for tol in tols:
                t = cstar.transition(rhos, ratios <= tol, n_boot=n_boot)
                t95 = cstar.transition(rhos, ratios <= tol, level=0.95, n_boot=n_boot)
                rows.append(
                    {
                        "shape": shape,
                        "dim": r * (m + n) - r * r,
                        "linear_bound": (r * (m + n) - r * r) / (r * max(m, n)),
                        "solver": solver,
                        "budget": budget,
                        "tol": tol,
                        "rho50": t.rho50,
                        "low": t.low,
                        "high": t.high,
                        "censored": t.censored,
                        "rho95": t95.rho50,
                        "low95": t95.low,
                        "high95": t95.high,
                        "diverged": float(np.mean(~np.isfinite(ratios))),
                    }
                )
    return rows


def _series(records: list[dict], shape: str, solver: str, tol: float):
    """``(rhos [G], budgets [B], success [G, B, D])`` of one (shape, solver); None if absent."""
    recs = sorted((r for r in records if (r["shape"], r["solver"]) == (shape, solver)),
                  key=lambda r: r["rho"])  # fmt: skip
    if not recs:
        return None
    ratios = np.array([r["ratios"] for r in recs])  # (G, B, D)
    return np.array([r["rho"] for r in recs]), list(recs[0]["budgets"]), ratios <= tol


def _limit_dict(e: scaling.Extrapolation) -> dict:
    return {"value": e.value, "low": e.low, "high": e.high, "a": e.a, "b": e.b,
            "reason": e.reason}  # fmt: skip


def budget_limits(records: list[dict], cfg: CStarConfig) -> dict:
    """GD's 50% and 95% points at each budget and their limit as the budget grows, per shape.

    ``{shape: {level: {"points", "limit", "boot_limits"}, "capacity": ...}}``: ``points`` per
    budget (nan where censored), ``limit`` the :func:`ntk.theory.scaling.extrapolate` of
    ``point(T) = point_inf + a T^-b`` with its interval, ``boot_limits`` [n_boot] the same fit
    per resample (for :func:`finite_size`). ``capacity`` is the strong solver's (LM, else
    Adam; longest budget, strictest tol) 50% point with its resamples.
    """
    out: dict = {}
    strict = min(cfg.tols)
    for shape in cfg.shapes:
        series = _series(records, shape, "gd", cfg.tol)
        entry: dict = {}
        if series is not None:
            rhos, budgets, success = series
            for level in (0.5, 0.95):
                est, boots = scaling.bootstrap_crossings(rhos, success, level=level,
                                                         n_boot=cfg.n_boot)  # fmt: skip
                lim = scaling.extrapolate(budgets, est, boots, grid=rhos)
                entry[level] = {"budgets": budgets, "points": est.tolist(),
                                "limit": _limit_dict(lim), "boot_limits": scaling.boot_limits(
                                    budgets, est, boots), "longest": est[-1],
                                "boot_longest": boots[:, -1]}  # fmt: skip
        for solver in ("lm", "adam"):
            series = _series(records, shape, solver, strict)
            if series is not None:
                rhos, _, success = series
                est, boots = scaling.bootstrap_crossings(rhos, success[:, -1:], level=0.5,
                                                         n_boot=cfg.n_boot)  # fmt: skip
                entry["capacity"] = {"solver": solver, "point": est[0], "boots": boots[:, 0]}
                break
        out[shape] = entry
    return out


def finite_size(limits: dict, cfg: CStarConfig) -> list[dict]:
    """Finite-size scaling: the transition against the manifold dimension ``d`` over shapes of
    one rank and aspect ratio m / n (groups of at least three sizes), extrapolated with
    ``point(d) = point_inf + a d^-b`` (:func:`ntk.theory.scaling.extrapolate`; the draws of
    different shapes are independent, so their resamples are paired at random).

    One row per (group, quantity, model): GD's budget limit (50%; nan past the grid), GD's
    50% point at its longest budget, and the capacity point; each with b free (``a d^-b``:
    undefined when the points show no trend, as noise over a few sizes often does) and b = 1
    (``a / d``, the leading finite-size correction: defined from two sizes on).
    """
    groups: dict[tuple, list[str]] = {}
    for shape in cfg.shapes:
        m, n, r = parse_shape(shape)
        groups.setdefault((r, round(m / n, 6)), []).append(shape)
    rows = []
    for (r, aspect), shapes in groups.items():
        shapes = [s for s in shapes if limits.get(s, {}).get(0.5)]
        if len(shapes) < 3:
            continue
        shapes.sort(key=lambda s: _dim(s))
        dims = [_dim(s) for s in shapes]
        quantities = {
            "GD limit (budget -> inf)": [(_inside(limits[s][0.5]["limit"]),
                                          limits[s][0.5]["boot_limits"]) for s in shapes],
            f"GD at {cfg.gd_budgets[-1]} steps": [(limits[s][0.5]["longest"],
                                                   limits[s][0.5]["boot_longest"]) for s in shapes],
        }  # fmt: skip
        if all("capacity" in limits[s] for s in shapes):
            caps = [limits[s]["capacity"] for s in shapes]
            quantities["capacity"] = [(c["point"], c["boots"]) for c in caps]
        for name, pairs in quantities.items():
            est = np.array([p[0] for p in pairs], float)
            boots = np.stack([p[1] for p in pairs], axis=1)  # (n_boot, shapes)
            for model, b_grid in (("a d^-b", scaling.B_GRID), ("a / d", np.array([1.0]))):
                lim = scaling.extrapolate(dims, est, boots, grid=np.array(cfg.rhos),
                                          b_grid=b_grid)  # fmt: skip
                rows.append({"rank": r, "aspect": aspect, "shapes": shapes, "dims": dims,
                             "quantity": name, "model": model, "points": est.tolist(),
                             "limit": _limit_dict(lim)})  # fmt: skip
    return rows


def _inside(limit: dict) -> float:
    """A shape's budget limit for the finite-size fit: nan when it lies past the rho grid
    (an extrapolation beyond the measured range is not a point to fit)."""
    return (
        float("nan") if limit["reason"] in ("below the grid", "above the grid") else limit["value"]
    )


def _dim(shape: str) -> int:
    m, n, r = parse_shape(shape)
    return r * (m + n) - r * r


def limits_markdown(limits: dict, sizes: list[dict], cfg: CStarConfig) -> str:
    """GD's points against its budget with their limits, and the finite-size table."""
    lines = [
        f"### Gradient descent's transition as its budget grows (tol {cfg.tol:g})",
        "",
        "Each point is extrapolated with point(T) = point_inf + a T^-b (b > 0 profiled, "
        "least squares); [95% bootstrap interval over the draws, widened to the rho grid cell "
        "the limit falls in; n/a where undefined].",
        "",
        "| m x n x r | level | point at "
        + " / ".join(map(str, cfg.gd_budgets))
        + " steps | limit [95% CI] | a, b | note |",
        "|---|---|---|---|---|---|",
    ]
    for shape, entry in limits.items():
        for level in (0.5, 0.95):
            if level not in entry:
                continue
            e, lim = entry[level], entry[level]["limit"]
            lines.append(
                f"| {shape} | {level:.0%} | {' / '.join(_fmt(x) for x in e['points'])} | "
                f"{_fmt(lim['value'])} [{_fmt(lim['low'])}, {_fmt(lim['high'])}] | "
                f"{_fmt(lim['a'])}, {_fmt(lim['b'])} | {lim['reason'] or ''} |"
            )
    if sizes:
        lines += [
            "",
            "### Finite-size scaling (same rank and aspect ratio, point(d) = point_inf + a d^-b "
            "over the manifold dimension d; b free, or fixed at 1)",
            "",
            "| r, m/n | quantity | model | points at d = ... | limit [95% CI] | a, b | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sizes:
            lim = row["limit"]
            pts = ", ".join(f"{d}: {_fmt(x)}" for d, x in zip(row["dims"], row["points"],
                                                                strict=True))  # fmt: skip
            lines.append(
                f"| {row['rank']}, {row['aspect']:g} | {row['quantity']} | {row['model']} | "
                f"{pts} | "
                f"{_fmt(lim['value'])} [{_fmt(lim['low'])}, {_fmt(lim['high'])}] | "
                f"{_fmt(lim['a'])}, {_fmt(lim['b'])} | {lim['reason'] or ''} |"
            )
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def conclusion(
    rows: list[dict], tol: float, limits: dict | None = None, sizes: list[dict] | None = None
) -> dict:
    """GD's transition (the paper's estimand) vs the capacity constant, per shape.

    * ``gd_constant`` / ``gd_ci``: gradient descent's rho_50 and interval at its longest budget
      and the headline ``tol``: the constant the paper reports (GD reaching zero loss);
      ``gd`` has its rho_50 per budget (falling with the budget: an optimization effect).
    * ``capacity`` / ``capacity_ci``: the strongest solver's (LM, else Adam; longest budget)
      rho_50 at the strictest threshold (near misses below rho = 1 pass a lenient one): the
      dimension count, not the paper's constant.

    * ``gd_limit`` / ``gd_limit95``: the limit of GD's 50% / 95% point as its budget grows
      (:func:`budget_limits`: value, low, high, a, b, reason), when ``limits`` is given;
      ``finite_size``: the :func:`finite_size` rows (limits over the manifold dimension).

    Intervals are ``[low, high]`` with nan where undefined; ``gd_range`` / ``capacity_range``
    are the smallest and largest estimate over shapes (None without any).
    """
    limits = limits or {}
    strict = min(r["tol"] for r in rows)
    at = [r for r in rows if r["tol"] == tol]
    out: dict = {"tol": tol, "strict_tol": strict, "shapes": {}}
    for shape in dict.fromkeys(r["shape"] for r in at):
        mine = [r for r in at if r["shape"] == shape]
        mine_strict = [r for r in rows if r["shape"] == shape and r["tol"] == strict]
        best = {}
        for solver in ("lm", "adam", "gd"):
            cand = [r for r in mine_strict if r["solver"] == solver]
            if cand:
                best[solver] = max(cand, key=lambda r: r["budget"])
        gd = sorted((r for r in mine if r["solver"] == "gd"), key=lambda r: r["budget"])
        strong = best.get("lm") or best.get("adam")
        longest = gd[-1] if gd else None
        out["shapes"][shape] = {
            "capacity": strong["rho50"] if strong else None,
            "capacity_ci": [strong["low"], strong["high"]] if strong else None,
            "capacity_solver": f"{strong['solver']} {strong['budget']}" if strong else None,
            "gd": {r["budget"]: r["rho50"] for r in gd},
            "gd_constant": longest["rho50"] if longest else None,
            "gd_ci": [longest["low"], longest["high"]] if longest else None,
            "gd_budget": longest["budget"] if longest else None,
            "linear_bound": mine[0]["linear_bound"],
            "gd_limit": limits.get(shape, {}).get(0.5, {}).get("limit"),
            "gd_limit95": limits.get(shape, {}).get(0.95, {}).get("limit"),
        }

    def spread(key):
        xs = [v[key] for v in out["shapes"].values() if v[key] is not None]
        xs = [x for x in xs if np.isfinite(x)]
        return [min(xs), max(xs)] if xs else None

    out["capacity_range"] = spread("capacity")
    out["gd_range"] = spread("gd_constant")
    out["finite_size"] = list(sizes or [])
    return out


def markdown(rows: list[dict], cfg: CStarConfig) -> str:
    lines = [
        f"Success: L_end / L_start <= tol; rho = (r(m+n) - r^2) / KN; {cfg.draws} draws per "
        f"point; rho_50 = 50% crossing of the isotonic success curve, [95% bootstrap interval, "
        f"widened to the grid cell the crossing falls in; n/a where undefined]. "
        f"Paper: C* = {PAPER_C_STAR}. Capacity bounds: 1 <= C* <= dim / (r max(m, n)).",
        "",
        f"### Headline threshold tol = {cfg.tol:g}",
        "",
        "| m x n x r | dim | bound dim/(r max(m,n)) | solver | budget | rho_50 [95% CI] "
        "| rho_95 [95% CI] | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["tol"] != cfg.tol:
            continue
        lines.append(
            f"| {r['shape']} | {r['dim']} | {r['linear_bound']:.3f} | {r['solver']} | "
            f"{r['budget']} | {_fmt(r['rho50'])} [{_fmt(r['low'])}, {_fmt(r['high'])}]"
            f"{' (' + r['censored'] + ')' if r['censored'] else ''} | "
            f"{_fmt(r.get('rho95'))} [{_fmt(r.get('low95'))}, {_fmt(r.get('high95'))}] | "
            f"{r['diverged']:.0%} |"
        )
    lines += [
        "",
        "### Dependence on the success threshold",
        "",
        "| m x n x r | solver | budget | " + " | ".join(f"tol {t:g}" for t in cfg.tols) + " |",
        "|---|---|---|" + "---|" * len(cfg.tols),
    ]
    seen = dict.fromkeys((r["shape"], r["solver"], r["budget"]) for r in rows)
    for shape, solver, budget in seen:
        cells = []
        for tol in cfg.tols:
            (row,) = [
                r
                for r in rows
                if (r["shape"], r["solver"], r["budget"], r["tol"]) == (shape, solver, budget, tol)
            ]
            cells.append(f"{_fmt(row['rho50'])} [{_fmt(row['low'])}, {_fmt(row['high'])}]")
        lines.append(f"| {shape} | {solver} | {budget} | " + " | ".join(cells) + " |")
    summary = conclusion(rows, cfg.tol)
    lines += ["", "### Capacity constant vs optimization effect", ""]
    for shape, v in summary["shapes"].items():
        gd = ", ".join(f"{b}: {_fmt(x)}" for b, x in v["gd"].items())
        cap = v["capacity_ci"] or [None, None]
        gci = v["gd_ci"] or [None, None]
        lines.append(
            f"- {shape}: GD (the paper's estimand) rho_50 = {_fmt(v['gd_constant'])} "
            f"[{_fmt(gci[0])}, {_fmt(gci[1])}] at {v['gd_budget']} steps (tol {cfg.tol:g}), "
            f"by budget {gd}; capacity rho_50 = {_fmt(v['capacity'])} "
            f"(tol {summary['strict_tol']:g}) [{_fmt(cap[0])}, {_fmt(cap[1])}] "
            f"({v['capacity_solver']}); linear-algebra bound {v['linear_bound']:.3f}."
        )
    return "\n".join(lines)


def plot(records: list[dict], cfg: CStarConfig, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in records))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for solver in cfg.solvers:
            recs = sorted(
                (r for r in records if r["shape"] == shape and r["solver"] == solver),
                key=lambda r: r["rho"],
            )
            if not recs:
                continue
            rhos = [r["rho"] for r in recs]
            for b, budget in enumerate(recs[0]["budgets"]):
                p = [np.mean(np.array(r["ratios"][b]) <= cfg.tol) for r in recs]
                ax.plot(rhos, p, marker=".", label=f"{solver} {budget}")
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.axvline(PAPER_C_STAR, color="r", lw=0.8, ls="--", label="paper 1.35")
        ax.set_xlabel("rho = (r(m+n) - r^2) / KN")
        ax.set_ylabel(f"P(L_end/L_0 <= {cfg.tol:g})")
        ax.set_title(shape)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(cfg: CStarConfig, *, progress: bool = True) -> dict:
    """Points, transitions, report and plot; returns ``{run_dir, rows, conclusion, report}``."""
    run_dir = os.path.join(cfg.out, cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.json")
    skip = ("out", "tols", "tol", "restart_iters", "n_boot")
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    fields = json.loads(json.dumps(fields))
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        if saved.get("seed") != fields["seed"] or saved.get("draws") != fields["draws"]:
            raise ValueError(
                f"{run_dir} holds points with another seed or draws count ({saved}); use another "
                "--name or delete that directory."
            )
    with open(config_path, "w") as f:
        json.dump(fields, f, indent=1)
    records = run_points(cfg, run_dir, progress=progress)
    rows = transitions(records, cfg.tols)
    text = markdown(rows, cfg)
    limits = budget_limits(records, cfg) if "gd" in cfg.solvers else {}
    sizes = finite_size(limits, cfg)
    if limits:
        text += "\n\n" + limits_markdown(limits, sizes, cfg)
    failures = []
    if cfg.restart_iters and "gd" in cfg.solvers:
        failures = run_failures(cfg, run_dir, progress=progress)
        text += "\n\n" + failures_markdown(failures, cfg.tol)
    png = plot(records, cfg, os.path.join(run_dir, "plots", "cstar.png"))
    report = os.path.join(run_dir, "report.md")
    with open(report + ".tmp", "w") as f:
        f.write(f"# C* by simulation\n\n{text}\n\n![success vs rho](plots/cstar.png)\n")
    os.replace(report + ".tmp", report)
    seconds = sum(r["seconds"] for r in records + failures)
    return {
        "run_dir": run_dir,
        "rows": rows,
        "conclusion": conclusion(rows, cfg.tol, limits, sizes),
        "failures": failures,
        "markdown": text,
        "plot": png,
        "seconds": seconds,
    }


def parse_args(argv: list[str] | None = None) -> CStarConfig:
    """Maps the command line one-to-one onto :class:`CStarConfig` fields."""
    parser = argparse.ArgumentParser(prog="python -m experiments.cstar", description=__doc__)
    for field in dataclasses.fields(CStarConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name in ("shapes", "solvers"):
            parser.add_argument(flag, nargs="+")
        elif field.name in ("rhos", "tols"):
            parser.add_argument(flag, nargs="+", type=float)
        elif field.name in ("draws", "seed", "restart_iters", "n_boot"):
            parser.add_argument(flag, type=int)
        elif field.name == "gd_budgets":
            parser.add_argument(flag, nargs="+", type=int)
        elif field.name == "tol":
            parser.add_argument(flag, type=float)
        else:
            parser.add_argument(flag)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return CStarConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        result = run(cfg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print(result["markdown"])
    print(f"report: {result['run_dir']}/report.md ({result['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
