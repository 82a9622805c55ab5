"""Spurious minima on the real problem: ``python -m experiments.landscape [--starts 20]``.

The linearized LoRA model of a real task (MR on the embedded MiniLM by default, query and
value of the last two layers, as :mod:`experiments.pl`) with squared error at rank r = 1: a
matrix-sensing problem with KN measurements given by the real Jacobians. From ``starts`` random
points (Gaussian A and B) Levenberg-Marquardt runs to convergence in float64; each end point is
classified by its gradient norm and the smallest eigenvalue of its Hessian (Hessian-vector
products and Lanczos, :mod:`ntk.theory.landscape`) as a global minimum, a spurious minimum, a
saddle or not stationary. Beside them: the spectrum and condition number of the eNTK Gram
matrix of the adapted kernels (:func:`ntk.theory.sensing.gram`). Writes
``runs/<name>/landscape.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments import cli, outputs
from experiments import pl as pl_exp
from lora_jax import lora
from lora_jax.errors import ConfigError
from ntk.theory import landscape, sensing


@dataclasses.dataclass(frozen=True, kw_only=True)
class LandscapeConfig:
    """The random-start experiment.

    Attributes:
      name: run directory name under ``out``.
      model: encoder (``minilm`` = the embedded MiniLM-L6).
      task: task name.
      seed: few-shot sampling seed (the starts are seeded ``seed * 1000 + i``).
      k: examples per class.
      rank: LoRA rank.
      targets: LoRA target modules.
      layers: adapted layer indices; empty = all layers.
      starts: random starts.
      init_scale: A ~ N(0, init_scale^2 / m), B ~ N(0, init_scale^2 / n).
      lm_iters: Levenberg-Marquardt iterations per start.
      lanczos_iters: Lanczos steps per end point.
      grad_tol: an end point is stationary when its gradient norm is at most this.
      hess_tol: it is a saddle when ``lam_min < -hess_tol |lam_max|``.
      loss_tol: a minimum is global when its loss is within this of the lowest end loss.
      zero_tol: the lowest end loss counts as zero when at most this share of the start loss.
      max_length: token length.
      out: parent directory of run directories.
    """

    name: str = "landscape"
    model: str = "minilm"
    task: str = "mr"
    seed: int = 13
    k: int = 16
    rank: int = 1
    targets: str = "query|value"
    layers: tuple[int, ...] = (4, 5)
    starts: int = 20
    init_scale: float = 1.0
    lm_iters: int = 100
    lanczos_iters: int = 60
    grad_tol: float = 1e-6
    hess_tol: float = 1e-6
    loss_tol: float = 1e-8
    zero_tol: float = 1e-8
    max_length: int = 48
    out: str = "runs"

    def __post_init__(self):
        if min(self.rank, self.k, self.starts, self.lm_iters, self.lanczos_iters) < 1:
            raise ConfigError(
                f"rank, k, starts, lm_iters and lanczos_iters must be >= 1; got {self.rank}, "
                f"{self.k}, {self.starts}, {self.lm_iters}, {self.lanczos_iters}."
            )
        if min(self.init_scale, self.grad_tol, self.hess_tol, self.zero_tol) <= 0:
            raise ConfigError(
                "init_scale, grad_tol, hess_tol and zero_tol must be > 0; got "
                f"{self.init_scale}, {self.grad_tol}, {self.hess_tol}, {self.zero_tol}."
            )


def random_start(key: jax.Array, adapters: dict, scale: float) -> dict:
    """Gaussian A [m, r] ~ N(0, scale^2 / m) and B [r, n] ~ N(0, scale^2 / n) per path."""
    out = {}
    for i, (path, ab) in enumerate(sorted(adapters.items())):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        a, b = ab["lora_a"], ab["lora_b"]
        out[path] = {
            "lora_a": scale * jax.random.normal(ka, a.shape, a.dtype) / np.sqrt(a.shape[0]),
            "lora_b": scale * jax.random.normal(kb, b.shape, b.dtype) / np.sqrt(b.shape[1]),
        }
    return out


def end_point(problem: sensing.SensingProblem, targets, adapters, lanczos_iters: int) -> dict:
    """Loss, gradient norm and extreme Hessian eigenvalues (Lanczos) of the squared error
    ``1/2 ||outputs - targets||^2 / N`` at ``adapters``."""
    n = problem.f0.shape[0]
    flat, unravel = ravel_pytree(adapters)

    def loss(x, data):
        r = sensing.outputs(data[0], unravel(x)) - data[1]
        return 0.5 * jnp.sum(r * r) / n

    hv = landscape.hvp(loss, flat, (problem, targets))
    lz = landscape.lanczos(
        lambda v: np.asarray(hv(jnp.asarray(v, flat.dtype))),
        flat.size,
        iters=min(lanczos_iters, flat.size),
    )
    return {
        "loss": float(loss(flat, (problem, targets))),
        "grad_norm": float(jnp.linalg.norm(jax.grad(loss)(flat, (problem, targets)))),
        "lam_min": float(lz.ritz[0]),
        "lam_max": float(lz.ritz[-1]),
    }


def gram_spectrum(problem: sensing.SensingProblem) -> dict:
    """Eigenvalues (descending) and condition number of the eNTK Gram matrix [NK, NK]."""
    eig = np.linalg.eigvalsh(sensing.gram(problem))[::-1]
    return {
        "eigvals": eig.tolist(),
        "cond": float(eig[0] / eig[-1]) if eig[-1] > 0 else float("inf"),
    }


def run(cfg: LandscapeConfig, *, resume: bool = True) -> dict:
    """Every start, the classification and the Gram spectrum; returns the results."""
    start = time.time()
    run_dir = os.path.join(cfg.out, cfg.name)
    saved = os.path.join(run_dir, "landscape.json")
    if resume and (results := outputs.saved_results(saved, cfg)) is not None:
        return results
    lcfg = lora.LoraConfig(
        r=cfg.rank, alpha=2.0 * cfg.rank, targets=cfg.targets, layers=cfg.layers or None
    )
    problem, labels, _, params = pl_exp.load_problem(
        cfg.model, cfg.task, cfg.seed, cfg.k, cfg.max_length, lcfg
    )
    results: dict = {"config": dataclasses.asdict(cfg), "jacobian_seconds": time.time() - start}
    n, k = problem.f0.shape
    results.update(kn=int(n * k), dim=pl_exp.manifold_dim(problem, cfg.rank))
    with jax.enable_x64():
        problem = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), problem)
        results["gram"] = gram_spectrum(problem)
        targets = jax.nn.one_hot(labels, k, dtype=jnp.float64)
        template = jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float64), lora.init(jax.random.key(0), params, lcfg)
        )
        points = []
        for i in range(cfg.starts):
            t0 = time.time()
            a0 = random_start(jax.random.key(cfg.seed * 1000 + i), template, cfg.init_scale)
            losses, end = sensing.levenberg_marquardt(problem, targets, a0, iters=cfg.lm_iters)
            point = end_point(problem, targets, end, cfg.lanczos_iters)
            points.append({"start": i, "loss_start": float(losses[0]), **point,
                           "seconds": time.time() - t0})  # fmt: skip
    results["points"] = classify_points(points, cfg)
    results["counts"] = dict(Counter(p["class"] for p in results["points"]))
    results["seconds"] = time.time() - start
    os.makedirs(run_dir, exist_ok=True)
    with open(saved + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(saved + ".tmp", saved)
    return results


def classify_points(points: list[dict], cfg: LandscapeConfig) -> list[dict]:
    """Each end point with its :class:`ntk.theory.landscape.EndPoint` (pure): the reference
    loss is the lowest end loss, or 0 when that is below ``zero_tol`` of the start loss."""
    best = min(p["loss"] for p in points)
    if best <= cfg.zero_tol * max(p["loss_start"] for p in points):
        best = 0.0
    out = []
    for p in points:
        c = landscape.classify(
            p["loss"], p["grad_norm"], p["lam_min"], p["lam_max"], best,
            grad_tol=cfg.grad_tol, hess_tol=cfg.hess_tol, loss_tol=cfg.loss_tol,
        )  # fmt: skip
        out.append({**p, "class": c.value, "best_loss": best})
    return out


def markdown(results: dict) -> str:
    g = results["gram"]
    eig = g["eigvals"]
    lines = [
        f"Linearized LoRA at r = {results['config']['rank']}, squared error: manifold "
        f"dimension {results['dim']} against KN = {results['kn']}; "
        f"{len(results['points'])} random starts, Levenberg-Marquardt "
        f"({results['config']['lm_iters']} iterations, float64).",
        "",
        "| start | loss at start | loss at end | gradient norm | Hessian lam_min | "
        "Hessian lam_max | end point |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['start']} | {p['loss_start']:.4g} | {p['loss']:.3g} | {p['grad_norm']:.2g} | "
            f"{p['lam_min']:.2g} | {p['lam_max']:.3g} | {p['class']} |"
        )
    counts = ", ".join(f"{v} {k}" for k, v in sorted(results["counts"].items()))
    lines += [
        "",
        f"End points: {counts}.",
        "",
        f"eNTK Gram matrix of the adapted kernels ({len(eig)} x {len(eig)}): largest "
        f"eigenvalue {eig[0]:.4g}, smallest {eig[-1]:.4g}, condition number {g['cond']:.3g}; "
        f"10 largest {', '.join(f'{x:.3g}' for x in eig[:10])}.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> LandscapeConfig:
    """Maps the command line one-to-one onto :class:`LandscapeConfig` fields."""
    return cli.parse_config(
        LandscapeConfig,
        argv,
        prog="python -m experiments.landscape",
        description=__doc__,
        lists={"layers": {"nargs": "*", "type": int}},
    )


def main(argv: list[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
