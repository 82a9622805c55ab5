"""Cross-entropy has no rank threshold: ``python -m experiments.pl [--rank 1] [--steps 1500]``.

Trains the linearized LoRA model (Jang et al.: linear in the base weights at W0, update
``scale * A @ B`` on query and value; by default of the last two layers, to keep each
full-batch step cheap on a CPU) of a real task, MR on the embedded MiniLM
by default, with full-batch gradient descent at rank r = 1, once with cross-entropy and once
with squared error, and records the loss and ``mu_t = ||grad L||^2 / (2 (L - L*))`` at every
step (:mod:`ntk.theory.pl`). L* = 0 for both: for cross-entropy it is certified when the
update's own outputs ``f - f0`` classify every training example correctly (then scaling the
update drives the loss to 0), and for squared error when the end loss is numerically zero;
without a certificate, mu_t with L* = 0 is still a lower bound on the ratio for the true
infimum. Writes ``runs/<name>/pl.json`` and ``plots/pl.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import ExperimentConfig
from experiments.workbench import Workbench
from lora_jax import lora
from lora_jax.losses import get_loss
from ntk.theory import pl, sensing


@dataclasses.dataclass(frozen=True, kw_only=True)
class PLConfig:
    """The PL check.

    Attributes:
      name: run directory name under ``out``.
      model: encoder (``minilm`` = the embedded MiniLM-L6).
      task: task name.
      seed: few-shot sampling seed (and adapter init).
      k: examples per class.
      rank: LoRA rank.
      targets: LoRA target modules.
      layers: adapted layer indices (PEFT ``layers_to_transform``); empty = all layers.
      steps: full-batch gradient-descent steps per loss.
      lr_ce: step size for cross-entropy.
      lr_mse: step size for squared error.
      max_length: token length.
      out: parent directory of run directories.
    """

    name: str = "pl"
    model: str = "minilm"
    task: str = "mr"
    seed: int = 13
    k: int = 16
    rank: int = 1
    targets: str = "query|value"
    layers: tuple[int, ...] = (4, 5)
    steps: int = 1000
    lr_ce: float = 0.05
    lr_mse: float = 0.02
    max_length: int = 48
    out: str = "runs"

    def __post_init__(self):
        if self.rank < 1 or self.steps < 1 or self.k < 1:
            raise ValueError(
                f"rank, steps and k must be >= 1; got {self.rank}, {self.steps}, {self.k}."
            )
        if self.lr_ce <= 0 or self.lr_mse <= 0:
            raise ValueError(f"learning rates must be > 0; got {self.lr_ce}, {self.lr_mse}.")


def load_problem(
    model: str, task: str, seed: int, k: int, max_length: int, lcfg: lora.LoraConfig
) -> tuple:
    """``(problem, labels, output_fn, params)`` of the linearized LoRA model on train data."""
    bench = Workbench(ExperimentConfig(model=model, tasks=(task,), k=k, max_length=max_length))
    output_fn, params = bench.prompt_model(task)
    data = bench.data(task, seed, mode="prompt")
    problem = sensing.lora_jacobians(output_fn, params, lcfg, data.train)
    return problem, data.train["labels"], output_fn, params


def run(cfg: PLConfig, *, problem_cache: dict | None = None, resume: bool = True) -> dict:
    """Both trajectories, their PL figures and the plot; returns the results dict.

    With ``resume``, a ``pl.json`` of the same configuration in the run directory is returned
    instead of recomputing.
    """
    start = time.time()
    run_dir = os.path.join(cfg.out, cfg.name)
    saved = os.path.join(run_dir, "pl.json")
    if resume and os.path.exists(saved):
        with open(saved) as f:
            results = json.load(f)
        if results["config"] == json.loads(json.dumps(dataclasses.asdict(cfg))):
            return results
    lcfg = lora.LoraConfig(
        r=cfg.rank, alpha=2.0 * cfg.rank, targets=cfg.targets, layers=cfg.layers or None
    )
    key = (cfg.model, cfg.task, cfg.seed, cfg.k, cfg.max_length, cfg.targets, cfg.layers)
    cache = problem_cache if problem_cache is not None else {}
    if key not in cache:
        cache[key] = load_problem(cfg.model, cfg.task, cfg.seed, cfg.k, cfg.max_length, lcfg)
    problem, labels, _, params = cache[key]
    jac_seconds = time.time() - start
    adapters0 = lora.init(jax.random.key(cfg.seed), params, lcfg)
    results = {"config": dataclasses.asdict(cfg), "jacobian_seconds": jac_seconds}
    for loss_name, lr in (("ce", cfg.lr_ce), ("mse", cfg.lr_mse)):
        t0 = time.time()
        loss = get_loss(loss_name)
        for _ in range(4):  # a diverged run (non-finite loss) is retried at lr / 4
            traj = pl.trajectory(
                lambda a, data, loss=loss: loss(sensing.outputs(data[0], a), data[1]),
                adapters0,
                (problem, labels),
                steps=cfg.steps,
                learning_rate=lr,
            )
            if np.isfinite(traj.loss).all():
                break
            lr /= 4
        outputs = sensing.outputs(problem, traj.params)
        update = outputs - problem.f0
        acc = float(jnp.mean(jnp.argmax(outputs, -1) == labels))
        certified = bool(jnp.all(jnp.argmax(update, -1) == labels))
        if loss_name == "mse":
            certified = bool(traj.loss[-1] <= 1e-6 * traj.loss[0])
        mu = pl.pl_constants(traj, 0.0)
        skip = max(1, cfg.steps // 100)  # the first steps leave the B = 0 saddle
        tail = mu[cfg.steps // 2 :]
        # Exponent p of ||grad L||^2 ~ L^p over the second half: a PL inequality with a fixed
        # mu needs p <= 1; p = 2 means ||grad L|| ~ L (mu_t then falls with L).
        half = slice(len(traj.loss) // 2, None)
        ok = (traj.loss[half] > 0) & (traj.grad_sq[half] > 0) & np.isfinite(traj.loss[half])
        exponent = (
            float(np.polyfit(np.log(traj.loss[half][ok]), np.log(traj.grad_sq[half][ok]), 1)[0])
            if ok.sum() > 2
            else None
        )
        results[loss_name] = {
            "lr": lr,
            "loss": traj.loss.tolist(),
            "grad_sq": traj.grad_sq.tolist(),
            "grad_exponent": exponent,
            "mu": [None if not np.isfinite(x) else float(x) for x in mu],
            "loss_start": float(traj.loss[0]),
            "loss_end": float(traj.loss[-1]),
            "train_accuracy": acc,
            "l_star_certified": certified,
            "mu_min": float(np.nanmin(mu[skip:])) if np.isfinite(mu[skip:]).any() else None,
            "mu_min_second_half": float(np.nanmin(tail)) if np.isfinite(tail).any() else None,
            "mu_end": float(mu[-1]) if np.isfinite(mu[-1]) else None,
            "seconds": time.time() - t0,
        }
    os.makedirs(run_dir, exist_ok=True)
    results["plot"] = plot(results, os.path.join(run_dir, "plots", "pl.png"))
    results["seconds"] = time.time() - start
    with open(saved + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(saved + ".tmp", saved)
    return results


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, label in (("ce", "cross-entropy"), ("mse", "squared error")):
        r = results[name]
        ax1.semilogy(r["loss"], label=f"{label} (lr {r['lr']:g})")
        mu = np.array([np.nan if x is None else x for x in r["mu"]])
        ax2.semilogy(mu, label=label)
    ax1.set_xlabel("GD step")
    ax1.set_ylabel("training loss (L* = 0)")
    ax2.set_xlabel("GD step")
    ax2.set_ylabel("mu_t = |grad L|^2 / 2(L - L*)")
    cfg = results["config"]
    fig.suptitle(f"linearized LoRA, {cfg['task']} on {cfg['model']}, r = {cfg['rank']}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    lines = [
        "| loss | lr | L start | L end | train acc | L* = 0 certified | min mu_t | "
        "min mu_t, 2nd half | mu_t at end | p in grad^2 ~ L^p, 2nd half |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("ce", "mse"):
        r = results[name]
        fmt = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
        lines.append(
            f"| {name} | {r['lr']:g} | {r['loss_start']:.4g} | {r['loss_end']:.3g} | "
            f"{100 * r['train_accuracy']:.0f}% | {'yes' if r['l_star_certified'] else 'no'} | "
            f"{fmt(r['mu_min'])} | {fmt(r['mu_min_second_half'])} | {fmt(r['mu_end'])} | "
            f"{fmt(r['grad_exponent'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> PLConfig:
    """Maps the command line one-to-one onto :class:`PLConfig` fields."""
    parser = argparse.ArgumentParser(prog="python -m experiments.pl", description=__doc__)
    for field in dataclasses.fields(PLConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "layers":
            parser.add_argument(flag, nargs="*", type=int)
            continue
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(flag, type=kind)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return PLConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        results = run(cfg)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from err
    print(markdown(results))
    print(f"plot: {results['plot']} ({results['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
