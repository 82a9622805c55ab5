"""Bias and variance over LoRA rank: ``python -m experiments.bias_variance [--tasks mr trec]``.

For each task (MR: K = 2; TREC: K = 6), on the linearized LoRA model of the embedded MiniLM
(query and value of the last layer by default, so that the K = 6 Jacobians fit in memory):
the fit term (training cross-entropy floor at rank r within the Frobenius budget of the
minimum-norm exact fit) and the Rademacher complexity term of :mod:`ntk.theory.bias_variance`
for r = 1..16, their sum and its argmin; with ``--finetune-results`` (a ``results.jsonl`` of
``experiments.run``), the measured test error of real LoRA fine-tuning at each rank beside
them. Writes ``runs/<name>/bias_variance.json`` and ``plots/bias_variance.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

from experiments import report
from experiments.pl import load_problem
from lora_jax import lora
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
    max_length: int = 48
    finetune_results: str | None = None
    out: str = "runs"

    def __post_init__(self):
        if not self.tasks or not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"need tasks and ranks >= 1; got {self.tasks}, {self.ranks}.")
        if self.steps < 1 or self.draws < 2:
            raise ValueError(f"need steps >= 1 and draws >= 2; got {self.steps}, {self.draws}.")


def finetune_errors(path: str | None) -> dict[str, dict[int, list[float]]]:
    """task -> rank -> test errors of the LoRA cells in a ``results.jsonl`` (may be empty)."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in report.read_results(path) if path else []:
        if rec["method"] == "lora":
            out[rec["task"]][rec["rank"]].append(1.0 - rec["test_accuracy"])
    return out


def run_task(cfg: BiasVarianceConfig, task: str) -> dict:
    start = time.time()
    lcfg = lora.LoraConfig(r=1, alpha=2.0, targets=cfg.targets, layers=cfg.layers or None)
    problem, labels, _, _ = load_problem(cfg.model, task, cfg.seed, cfg.k, cfg.max_length, lcfg)
    jac_seconds = time.time() - start
    budgets = bv.min_norm_budgets(problem, np.asarray(labels))
    fit = bv.fit_curve(
        problem, labels, cfg.ranks, budgets, loss="ce", steps=cfg.steps, lr=cfg.lr, seed=cfg.seed
    )
    rad, se = bv.rademacher_curve(problem, cfg.ranks, budgets, draws=cfg.draws, seed=cfg.seed)
    result = bv.bias_variance(cfg.ranks, fit, bv.complexity_term(rad))
    n, k = problem.f0.shape
    return {
        "task": task,
        "N": int(n),
        "K": int(k),
        "matrices": len(problem.jac),
        "budgets": budgets,
        "ranks": list(cfg.ranks),
        "fit": result.fit.tolist(),
        "complexity": result.complexity.tolist(),
        "complexity_se": (bv.complexity_term(se)).tolist(),
        "total": result.total.tolist(),
        "best_rank": result.best_rank,
        "confidence_term": bv.confidence_term(int(n)),
        "fit_drop_1_to_max": float(result.fit[0] - result.fit[-1]),
        "jacobian_seconds": jac_seconds,
        "seconds": time.time() - start,
    }


def plot(results: list[dict], errors: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        r = res["ranks"]
        ax.plot(r, res["fit"], marker=".", label="fit (train CE floor)")
        ax.plot(r, res["complexity"], marker=".", label="complexity 2√2 G ΣR_k")
        ax.plot(r, res["total"], marker="o", label="sum")
        ax.axvline(res["best_rank"], color="k", ls=":", lw=0.8)
        ax.set_xlabel("rank r")
        ax.set_ylabel("nats")
        ax.set_title(f"{res['task']} (K = {res['K']}, N = {res['N']})")
        ax.grid(alpha=0.3)
        measured = errors.get(res["task"], {})
        if measured:
            ranks = sorted(measured)
            twin = ax.twinx()
            twin.errorbar(
                ranks,
                [100 * np.mean(measured[x]) for x in ranks],
                yerr=[100 * report.mean_std(measured[x])[1] for x in ranks],
                color="C3",
                marker="s",
                ls="--",
                capsize=3,
                label="fine-tuning test error",
            )
            twin.set_ylabel("test error (%)", color="C3")
            twin.legend(fontsize=7, loc="upper right")
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: list[dict], errors: dict) -> str:
    lines = []
    for res in results:
        measured = errors.get(res["task"], {})
        lines += [
            f"**{res['task']}** (K = {res['K']}, N = {res['N']}, {res['matrices']} adapted "
            f"matrices): argmin of fit + complexity at r = {res['best_rank']}; fit falls by "
            f"{res['fit_drop_1_to_max']:.4f} nats from r = {res['ranks'][0]} to "
            f"r = {res['ranks'][-1]}; rank-independent confidence term "
            f"{res['confidence_term']:.3f}.",
            "",
            "| r | fit | complexity | sum | fine-tuning test error |",
            "|---|---|---|---|---|",
        ]
        for i, r in enumerate(res["ranks"]):
            err = measured.get(r)
            cell = f"{100 * np.mean(err):.1f}% ({len(err)})" if err else ""
            lines.append(
                f"| {r} | {res['fit'][i]:.4f} | {res['complexity'][i]:.4f} | "
                f"{res['total'][i]:.4f} | {cell} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(cfg: BiasVarianceConfig) -> dict:
    """Every task (a task already in ``bias_variance.json`` with this config is reused)."""
    start = time.time()
    run_dir = os.path.join(cfg.out, cfg.name)
    saved_path = os.path.join(run_dir, "bias_variance.json")
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
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
    errors = finetune_errors(cfg.finetune_results)
    png = plot(results, errors, os.path.join(run_dir, "plots", "bias_variance.png"))
    out = {
        "config": dataclasses.asdict(cfg),
        "tasks": results,
        "finetune_errors": {t: {str(r): v for r, v in d.items()} for t, d in errors.items()},
        "plot": png,
        "markdown": markdown(results, errors),
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
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from err
    print(out["markdown"])
    print(f"plot: {out['plot']} ({out['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
