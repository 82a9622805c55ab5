"""C* on real sensing matrices: ``python -m experiments.cstar_real [--blocks 16x16x1] ...``.

The linearized LoRA model of MiniLM on MR (prompt readout, one adapted kernel: the query of
the last layer by default) is matrix sensing with the real per-example Jacobians as
measurement matrices (:func:`ntk.theory.sensing.lora_jacobians`). Solving it at full size
(384 x 384: manifold dimension 767 at r = 1, so the transition sits near N = 300 examples)
costs about 1e8 multiply-adds per GD step and draw; this study restricts LoRA to an m x n
block of the kernel instead (random rows and columns per draw, the real Jacobian entries on
them; :func:`ntk.theory.cstar.block_draws`), so that the same grid, solvers, budgets and
statistics as the Gaussian simulation (:mod:`experiments.cstar`) apply. Each draw takes
N of the pool's ``2 pool_k`` examples at random, generic targets y ~ N(0, 1/KN), and the
operator scaled to spectral norm 1 (its conditioning kept). rho = (r(m+n) - r^2) / (N K) over
a rho grid (N = round(dim / (K rho)) per block). Several blocks of one rank and aspect ratio
give the finite-size scaling of :func:`experiments.cstar.finite_size`. Writes
``runs/<name>/points.jsonl`` (resumes) and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from experiments import cli
from experiments import cstar as cstar_exp
from experiments import pl as pl_exp
from lora_jax import lora
from lora_jax.errors import ConfigError
from ntk.theory import cstar


@dataclasses.dataclass(frozen=True, kw_only=True)
class RealConfig:
    """One C* study on real Jacobians.

    Attributes:
      name: run directory name under ``out``.
      model: encoder (``minilm`` = the embedded MiniLM-L6).
      task: task name.
      seed: few-shot sampling seed of the pool.
      pool_k: examples per class in the pool the draws take their N examples from.
      targets: the adapted module (one kernel per layer in ``layers``: give one layer).
      layers: its layer.
      blocks: ``MxNxR`` each: the block of the kernel LoRA is restricted to, and the rank.
      rhos: the rho grid; each block runs N = round(dim / (K rho)) examples per draw.
      solvers: any of ``experiments.cstar.SOLVERS``.
      draws: draws per N.
      gd_budgets: GD's step counts (one trajectory), extrapolated to an infinite budget.
      tols: success thresholds on L_end / L_start; ``tol`` is the headline one.
      tol: the headline threshold.
      n_boot: bootstrap resamples.
      max_length: token length.
      out: parent directory of run directories.
    """

    name: str = "cstar_real"
    model: str = "minilm"
    task: str = "mr"
    seed: int = 13
    pool_k: int = 32
    targets: str = "query"
    layers: tuple[int, ...] = (5,)
    blocks: tuple[str, ...] = ("8x8x1", "16x16x1", "32x32x1")
    rhos: tuple[float, ...] = cstar_exp.CStarConfig.rhos
    solvers: tuple[str, ...] = ("gd", "lm")
    draws: int = 32
    gd_budgets: tuple[int, ...] = cstar_exp.CStarConfig.gd_budgets
    tols: tuple[float, ...] = (1e-2, 1e-4, 1e-6)
    tol: float = 1e-4
    n_boot: int = 1000
    max_length: int = 48
    out: str = "runs"

    def __post_init__(self):
        if len(self.layers) != 1 or "|" in self.targets:
            raise ConfigError(
                f"give one module and one layer (the sensing operator is one kernel's); got "
                f"targets={self.targets!r}, layers={list(self.layers)}."
            )
        try:
            self.study()  # the shapes, solvers, draws, budgets and tols checks
        except ValueError as err:
            raise ConfigError(str(err)) from None
        most = max(max(self.ns(b)) for b in self.blocks)
        if most > 2 * self.pool_k:
            raise ConfigError(
                f"the smallest rho needs N = {most} examples, more than the pool's "
                f"2 pool_k = {2 * self.pool_k}; fix: raise --pool-k or the smallest --rhos."
            )

    def ns(self, block: str, k: int = 2) -> list[int]:
        """Examples per draw of ``block`` (K = ``k`` outputs), one per distinct rho."""
        m, n, r = cstar_exp.parse_shape(block)
        dim = r * (m + n) - r * r
        return sorted({max(1, round(dim / (k * rho))) for rho in self.rhos})

    def study(self) -> cstar_exp.CStarConfig:
        """The same study in :class:`experiments.cstar.CStarConfig`'s terms (for its reports)."""
        return cstar_exp.CStarConfig(
            name=self.name, shapes=self.blocks, solvers=self.solvers, draws=self.draws,
            rhos=self.rhos, tols=self.tols, tol=self.tol,
            gd_budgets=self.gd_budgets, n_boot=self.n_boot, restart_iters=0, out=self.out,
        )  # fmt: skip


def load_jacobian(cfg: RealConfig) -> np.ndarray:
    """[P, K, M, N] Jacobians of the prompt outputs w.r.t. the adapted kernel on the pool."""
    lcfg = lora.LoraConfig(r=1, alpha=2.0, targets=cfg.targets, layers=cfg.layers)
    problem, *_ = pl_exp.load_problem(cfg.model, cfg.task, cfg.seed, cfg.pool_k,
                                      cfg.max_length, lcfg)  # fmt: skip
    (jac,) = problem.jac.values()
    return np.asarray(jac, np.float32)


def run(cfg: RealConfig, *, progress: bool = True) -> dict:
    """Points (resumed from ``points.jsonl``), transitions, budget limits and the report."""
    study = cfg.study()
    run_dir = os.path.join(cfg.out, cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "points.jsonl")
    records = cstar_exp.read_records(path)
    key = lambda rec: (rec["shape"], rec["solver"], rec["kn"], tuple(rec["budgets"]),  # noqa: E731
                       rec.get("setup"))  # fmt: skip
    setup = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                        if k in ("model", "task", "seed", "pool_k", "targets", "layers",
                                 "draws", "max_length")})  # fmt: skip
    wanted = [(b, s, k) for b in cfg.blocks for s in cfg.solvers for k in cfg.ns(b)]
    keys = {(b, s, 2 * k, cstar_exp.solver_settings(study, s)[0], setup): (b, s, k)
            for b, s, k in wanted}  # fmt: skip
    done = {key(rec) for rec in records}
    todo = [v for kk, v in keys.items() if kk not in done]
    seconds = {"jacobian": 0.0}
    if todo:
        t0 = time.time()
        jac = load_jacobian(cfg)
        seconds["jacobian"] = time.time() - t0
        for block, solver, k in todo:
            t0 = time.time()
            m, n, r = cstar_exp.parse_shape(block)
            budgets, lr = cstar_exp.solver_settings(study, solver)
            kn_max = jac.shape[1] * max(cfg.ns(block))
            arrays = cstar.block_draws(jac, cfg.seed, cfg.draws, k, m, n, r, kn_max=kn_max)
            ratios = cstar.solve(arrays, solver, budgets, lr)
            kn = k * jac.shape[1]
            rec = {"shape": block, "solver": solver, "kn": kn,
                   "rho": (r * (m + n) - r * r) / kn, "budgets": list(budgets),
                   "ratios": ratios.T.tolist(), "setup": setup,
                   "seconds": time.time() - t0}  # fmt: skip
            records.append(rec)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if progress:
                print(f"{block} {solver} N={k}: {rec['seconds']:.1f} s", file=sys.stderr)
    records = [rec for rec in records if key(rec) in keys]
    rows = cstar_exp.transitions(records, cfg.tols, n_boot=cfg.n_boot)
    limits = cstar_exp.budget_limits(records, study) if "gd" in cfg.solvers else {}
    sizes = cstar_exp.finite_size(limits, study)
    text = (
        f"Real sensing matrices: {cfg.model} on {cfg.task}, {cfg.targets} of layer "
        f"{cfg.layers[0]}, LoRA restricted to a random m x n block of the kernel (shape = "
        f"m x n x r), N of {2 * cfg.pool_k} examples per draw (KN = 2N), generic targets, "
        "operator scaled to spectral norm 1.\n\n" + cstar_exp.markdown(rows, study)
    )
    if limits:
        text += "\n\n" + cstar_exp.limits_markdown(limits, sizes, study)
    report = os.path.join(run_dir, "report.md")
    with open(report, "w") as f:
        f.write(f"# C* on real sensing matrices\n\n{text}\n")
    seconds["points"] = sum(rec["seconds"] for rec in records)
    return {"run_dir": run_dir, "rows": rows, "limits": limits, "markdown": text,
            "conclusion": cstar_exp.conclusion(rows, cfg.tol, limits, sizes),
            "seconds": seconds}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> RealConfig:
    """Maps the command line one-to-one onto :class:`RealConfig` fields."""
    several = {"nargs": "+"}
    return cli.parse_config(
        RealConfig, argv, prog="python -m experiments.cstar_real", description=__doc__,
        lists={"solvers": several, "blocks": several, "layers": {**several, "type": int},
               "gd_budgets": {**several, "type": int}, "tols": {**several, "type": float},
               "rhos": {**several, "type": float}},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    result = run(cfg)
    print(result["markdown"])
    secs = result["seconds"]
    print(f"report: {result['run_dir']}/report.md (Jacobians {secs['jacobian']:.0f} s, points "
          f"{secs['points']:.0f} s)", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
