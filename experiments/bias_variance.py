"""Bias and variance over LoRA rank: ``python -m experiments.bias_variance [--tasks mr trec]``.

For each task (MR: K = 2; TREC: K = 6), on the linearized LoRA model of the embedded MiniLM
(query and value of the last layer by default, so that the K = 6 Jacobians fit in memory):
the fit term (training cross-entropy of Adam on the LoRA factors at rank r, no norm ball), the
budget of each rank (the Frobenius norms of its trained update, per adapted matrix) and the
joint Rademacher complexity term over all K outputs of :mod:`ntk.theory.bias_variance` for
r = 1..16, their sum, its argmin, the whole bound (with the confidence term) against the loss
range c = 1 nat (how far from non-vacuous), and how much the fit falls from r = 1; with
``--finetune-results`` (a ``results.jsonl`` of ``experiments.run``), the measured test error of
real LoRA fine-tuning at each rank beside them. Writes ``runs/<name>/bias_variance.json`` and
``plots/bias_variance.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from experiments import report
from experiments.pl import load_problem
from lora_jax import lora
from lora_jax.errors import ConfigError, MissingFileError, UserError, user_message
from ntk.theory import bias_variance as bv


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiasVarianceConfig:
    """The bias / variance study.

    Attributes:
      name: run directory name under ``out``.
      model: encoder (``minilm`` = the embedded MiniLM-L6).
      tasks: task names.
      seed: few-shot sampling seed.
      k: examples per class.
      targets: LoRA target modules.
      layers: adapted layer indices (PEFT ``layers_to_transform``); empty = all.
      ranks: ranks r.
      steps: Adam steps of the fit term.
      lr: Adam step size of the fit term.
      draws: Monte-Carlo sign vectors of the Rademacher term.
      grid_base: the smallest budget of the union bound's grid (Frobenius norm).
      grid_levels: points of that grid (``grid_base * 2^j``); with the ranks they set the
        union bound's count.
      max_length: token length.
      finetune_results: optional ``results.jsonl`` with real LoRA cells of the same tasks.
      out: parent directory of run directories.
    """

    name: str = "bias_variance"
    model: str = "minilm"
    tasks: tuple[str, ...] = ("mr", "trec")
    seed: int = 13
    k: int = 16
    targets: str = "query|value"
    layers: tuple[int, ...] = (5,)
    ranks: tuple[int, ...] = tuple(range(1, 17))
    steps: int = 400
    lr: float = 1e-2
    draws: int = 32
    grid_base: float = 1e-3
    grid_levels: int = 40
    max_length: int = 48
    finetune_results: str | None = None
    out: str = "runs"

    def __post_init__(self):
        if not self.tasks or not self.ranks or min(self.ranks) < 1:
            raise ConfigError(f"need tasks and ranks >= 1; got {self.tasks}, {self.ranks}.")
        if self.steps < 1 or self.draws < 2:
            raise ConfigError(f"need steps >= 1 and draws >= 2; got {self.steps}, {self.draws}.")
        if not self.grid_base > 0 or self.grid_levels < 1:
            raise ConfigError(
                f"need grid_base > 0 and grid_levels >= 1; got {self.grid_base}, "
                f"{self.grid_levels}."
            )


def finetune_errors(
    path: str | None, tasks: tuple[str, ...] = (), ranks: tuple[int, ...] = ()
) -> dict[str, dict[int, list[float]]]:
    """Test errors of the real LoRA cells in a ``results.jsonl`` of ``experiments.run``.

    Args:
      path: the ``results.jsonl``; None gives ``{}``.
      tasks: tasks that must each have LoRA cells there.
      ranks: the ranks of the bound; each task's measured ranks must share one with them.

    Returns:
      ``{task: {rank: [1 - test accuracy, one per seed]}}``.

    Raises:
      MissingFileError: no file at ``path``.
      ConfigError: a task of ``tasks`` has no LoRA cell, or none at a rank of ``ranks``; the
        file holds several encoders' cells.
    """
    if path is None:
        return {}
    if not os.path.exists(path):
        raise MissingFileError(
            f"--finetune-results {path}: no such file; fix: pass the results.jsonl of an "
            "`experiments.run` with --methods lora (runs/<name>/results.jsonl)."
        )
    groups = report.lora_groups(report.read_results(path))
    encoders = sorted({str(model) for model, _ in groups})
    if len(encoders) > 1:
        raise ConfigError(
            f"--finetune-results {path} holds the cells of several encoders ({encoders}); fix: "
            "pass one encoder's results.jsonl (runs/<name>/<encoder>/results.jsonl)."
        )
    out = {
        task: {rank: [1.0 - acc for acc in by_seed.values()] for rank, by_seed in by_rank.items()}
        for (_, task), by_rank in groups.items()
    }
    for task in tasks:
        if task not in out:
            raise ConfigError(
                f"--finetune-results {path} has no LoRA cells of task {task!r} (it has "
                f"{sorted(out) or 'none'}); fix: run `experiments.run --methods lora --tasks "
                f"{task}` or drop {task!r} from --tasks."
            )
        if ranks and not set(out[task]) & set(ranks):
            raise ConfigError(
                f"--finetune-results {path}: task {task!r} has LoRA ranks {sorted(out[task])}, "
                f"none among --ranks {list(ranks)}; fix: add one of them to --ranks."
            )
    return out


def compare(res: dict, measured: dict[int, list[float]]) -> dict:
    """Where the measured test error is lowest vs where the bound (fit + complexity) is.

    Args:
      res: one task's result of :func:`run_task` (``ranks``, ``total``, ``best_rank``).
      measured: rank -> measured test errors (one per seed).

    Returns:
      ``measured``: rank -> [mean, sample std, seeds]; ``measured_best_rank`` (lowest mean
      error; ties go to the lower rank); ``bound_best_rank`` (over every rank of the bound);
      ``bound_best_rank_on_measured`` (over the ranks both have); ``common_ranks``; ``agree``
      (over the common ranks, the measured error and the bound are lowest at the same rank).
    """
    stats = {int(r): [*report.mean_std(v), len(v)] for r, v in sorted(measured.items())}
    common = [r for r in res["ranks"] if r in stats]
    total = dict(zip(res["ranks"], res["total"], strict=True))
    by_error = lambda r: (stats[r][0], r)  # noqa: E731
    best_bound = min(common, key=lambda r: (total[r], r)) if common else None
    return {
        "measured": stats,
        "measured_best_rank": min(stats, key=by_error),
        "bound_best_rank": res["best_rank"],
        "bound_best_rank_on_measured": best_bound,
        "common_ranks": common,
        "agree": bool(common) and best_bound == min(common, key=by_error),
    }


def run_task(cfg: BiasVarianceConfig, task: str) -> dict:
    """One task's curves: fit and budgets from one training of every rank, then the joint
    complexity at each rank's own budgets."""
    start = time.time()
    lcfg = lora.LoraConfig(r=1, alpha=2.0, targets=cfg.targets, layers=cfg.layers or None)
    problem, labels, _, _ = load_problem(cfg.model, task, cfg.seed, cfg.k, cfg.max_length, lcfg)
    jac_seconds = time.time() - start
    trained = bv.fit_with_norms(
        problem, labels, cfg.ranks, loss="ce", steps=cfg.steps, lr=cfg.lr, seed=cfg.seed
    )
    rad, se = bv.rademacher_curve(
        problem, cfg.ranks, trained.norms, draws=cfg.draws, seed=cfg.seed, joint=True
    )
    result = bv.bias_variance(cfg.ranks, trained.loss, bv.complexity_term(rad))
    n, k = problem.f0.shape
    confidence = bv.confidence_term(int(n))
    bound = result.total + confidence
    # The same bound made rigorous: budgets rounded up to a fixed grid, delta shared over
    # every grid point of every matrix and every rank.
    grid = bv.grid_budgets(trained.norms, base=cfg.grid_base, levels=cfg.grid_levels)
    rad_grid, _ = bv.rademacher_curve(
        problem, cfg.ranks, grid, draws=cfg.draws, seed=cfg.seed, joint=True
    )
    count = cfg.grid_levels ** len(problem.jac) * len(cfg.ranks)
    confidence_union = bv.confidence_term(int(n), count)
    union = np.asarray(result.fit) + bv.complexity_term(rad_grid) + confidence_union
    return {
        "task": task,
        "N": int(n),
        "K": int(k),
        "matrices": len(problem.jac),
        "budgets": {p: v.tolist() for p, v in trained.norms.items()},
        "ranks": list(cfg.ranks),
        "fit": result.fit.tolist(),
        "complexity": result.complexity.tolist(),
        "complexity_se": (bv.complexity_term(se)).tolist(),
        "total": result.total.tolist(),
        "best_rank": result.best_rank,
        "confidence_term": confidence,
        "bound_min": float(bound.min()),
        "vacuous_by": float(bound.min() / bv.LOSS_BOUND),
        "budgets_grid": {p: v.tolist() for p, v in grid.items()},
        "union_count": int(count),
        "confidence_union": confidence_union,
        "bound_union": union.tolist(),
        "bound_union_min": float(union.min()),
        "best_rank_union": int(cfg.ranks[int(np.argmin(union))]),
        "fit_drop_1_to_max": float(result.fit[0] - result.fit[-1]),
        "jacobian_seconds": jac_seconds,
        "seconds": time.time() - start,
    }


def plot(results: list[dict], errors: dict, path: str) -> str:
    """One panel per task: fit, complexity and their sum (nats, left axis) over rank, the
    bound's argmin (black dotted); with ``errors``, the measured fine-tuning test error (%,
    right axis, mean +- std over seeds) and its argmin (red dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        r = res["ranks"]
        ax.plot(r, res["fit"], marker=".", label="fit (train CE)")
        ax.plot(r, res["complexity"], marker=".", label="complexity 2√2 G R (joint)")
        ax.plot(r, res["total"], marker="o", label=f"sum (bound; min r = {res['best_rank']})")
        ax.axvline(res["best_rank"], color="k", ls=":", lw=0.8)
        if min(res["fit"]) > 0:  # the fit term is small beside the complexity: log scale
            ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_ylabel("nats")
        ax.set_title(f"{res['task']} (K = {res['K']}, N = {res['N']})")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        measured = errors.get(res["task"], {})
        if measured:
            cmp = compare(res, measured)
            ranks = sorted(cmp["measured"])
            twin = ax.twinx()
            twin.errorbar(
                ranks,
                [100 * cmp["measured"][x][0] for x in ranks],
                yerr=[100 * cmp["measured"][x][1] for x in ranks],
                color="C3",
                marker="s",
                ls="--",
                capsize=3,
                label=f"fine-tuning test error (min r = {cmp['measured_best_rank']})",
            )
            twin.axvline(cmp["measured_best_rank"], color="C3", ls=":", lw=0.8)
            twin.set_ylabel("test error (%)", color="C3")
            handles += twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=2)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: list[dict], errors: dict, source: str | None = None) -> str:
    """Per task: the table of fit, complexity, sum and measured test error (mean +- std over
    seeds) by rank, and where the measured error and the bound are lowest."""
    lines = []
    if source:
        lines += [f"Fine-tuning test errors: LoRA cells of `{source}`.", ""]
    for res in results:
        measured = errors.get(res["task"], {})
        cmp = compare(res, measured) if measured else None
        lines += [
            f"**{res['task']}** (K = {res['K']}, N = {res['N']}, {res['matrices']} adapted "
            f"matrices): argmin of fit + complexity at r = {res['best_rank']}; fit falls by "
            f"{res['fit_drop_1_to_max']:.4f} nats from r = {res['ranks'][0]} to "
            f"r = {res['ranks'][-1]}; rank-independent confidence term "
            f"{res['confidence_term']:.3f}; the whole bound is at least "
            f"{res['bound_min']:.3g} nats against a loss range of {bv.LOSS_BOUND:g}: "
            + (
                f"vacuous, {res['vacuous_by']:.3g} times too large."
                if res["bound_min"] > bv.LOSS_BOUND
                else "non-vacuous."
            )
            + (
                f" With the budgets on a grid and a union bound over {res['union_count']:.3g} "
                f"(grid point, rank) classes (confidence term {res['confidence_union']:.3f}), "
                f"the bound is at least {res['bound_union_min']:.3g} nats, lowest at "
                f"r = {res['best_rank_union']}."
                if "bound_union" in res
                else ""
            ),
            "",
            "| r | fit | complexity | sum | fine-tuning test error (%) |",
            "|---|---|---|---|---|",
        ]
        terms = zip(res["fit"], res["complexity"], res["total"], strict=True)
        rows = dict(zip(res["ranks"], terms, strict=True))
        for r in sorted(set(rows) | set(measured)):
            bound = " | ".join(f"{x:.4f}" for x in rows[r]) if r in rows else " | | "
            cell = ""
            if cmp and r in cmp["measured"]:
                mean, std, n = cmp["measured"][r]
                cell = f"{100 * mean:.1f} ± {100 * std:.1f} ({n})"
            lines.append(f"| {r} | {bound} | {cell} |")
        if cmp:
            mean, std, n = cmp["measured"][cmp["measured_best_rank"]]
            lines += [
                "",
                f"Measured test error is lowest at r = {cmp['measured_best_rank']} "
                f"({100 * mean:.1f} ± {100 * std:.1f}%, {n} seed{'s' * (n != 1)}); the bound is "
                f"lowest at r = {cmp['bound_best_rank']}, and at "
                f"r = {cmp['bound_best_rank_on_measured']} among the fine-tuned ranks "
                f"{cmp['common_ranks']}: the two minima "
                f"{'agree' if cmp['agree'] else 'disagree'}.",
            ]
        lines.append("")
    return "\n".join(lines)


def run(cfg: BiasVarianceConfig) -> dict:
    """Every task (a task already in ``bias_variance.json`` with this config is reused)."""
    start = time.time()
    run_dir = os.path.join(cfg.out, cfg.name)
    saved_path = os.path.join(run_dir, "bias_variance.json")
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    # Checked before any Jacobian is computed: a wrong file fails in a second.
    errors = finetune_errors(cfg.finetune_results, cfg.tasks, cfg.ranks)
    done = {}
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
        same = {k: v for k, v in saved["config"].items() if k != "finetune_results"}
        if same == {k: v for k, v in config.items() if k != "finetune_results"}:
            done = {t["task"]: t for t in saved["tasks"]}
    os.makedirs(run_dir, exist_ok=True)
    results = []
    for task in cfg.tasks:
        results.append(done.get(task) or run_task(cfg, task))
        with open(saved_path + ".tmp", "w") as f:  # partial: a stopped run resumes per task
            json.dump({"config": config, "tasks": results}, f)
        os.replace(saved_path + ".tmp", saved_path)
    png = plot(results, errors, os.path.join(run_dir, "plots", "bias_variance.png"))
    out = {
        "config": dataclasses.asdict(cfg),
        "tasks": results,
        "finetune_errors": {t: {str(r): v for r, v in d.items()} for t, d in errors.items()},
        "comparison": {
            t["task"]: compare(t, errors[t["task"]]) for t in results if t["task"] in errors
        },
        "plot": png,
        "markdown": markdown(results, errors, cfg.finetune_results),
        "seconds": time.time() - start,
    }
    with open(saved_path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(saved_path + ".tmp", saved_path)
    return out


def parse_args(argv: list[str] | None = None) -> BiasVarianceConfig:
    """Maps the command line one-to-one onto :class:`BiasVarianceConfig` fields."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bias_variance", description=__doc__
    )
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--layers", nargs="*", type=int)
    parser.add_argument("--ranks", nargs="+", type=int)
    for name in ("seed", "k", "steps", "draws", "max_length"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--lr", type=float)
    for name in ("name", "model", "targets", "finetune_results", "out"):
        parser.add_argument("--" + name.replace("_", "-"))
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return BiasVarianceConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
        )
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        out = run(cfg)
    except UserError as err:  # bad input: one line; a bug keeps its traceback
        raise SystemExit(f"error: {user_message(err)}") from err
    print(out["markdown"])
    print(f"plot: {out['plot']} ({out['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
