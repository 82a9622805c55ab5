"""Cross-entropy has no rank threshold: ``python -m experiments.pl [--rank 1] [--seeds ...]``.

Trains the linearized LoRA model (Jang et al.: linear in the base weights at W0, update
``scale * A @ B`` on query and value; by default of the last two layers, to keep each
full-batch step cheap on a CPU) of a real task, MR on the embedded MiniLM by default, with
full-batch gradient descent at rank r = 1 and cross-entropy, once per seed (the few-shot split
and the adapter init), until the loss is at most ``target_loss`` or ``max_steps`` pass.

What is tested is the Lojasiewicz form of the paper's claim for cross-entropy,
``||grad L|| >= c L`` along the trajectory (L* = 0, approached but not attained on data the
update separates). The PL form ``||grad L||^2 >= 2 mu L`` with one mu cannot hold as L -> 0
for cross-entropy (``||grad L|| ~ gamma L`` makes mu_t = gamma^2 L / 2 fall with L), and the
Lojasiewicz form is enough for GD to reach the infimum. The start B = 0 is no saddle (grad_B
is not zero there, only proportional to the small A), but the loss stays near log K for a
while: the plateau's end is detected from each loss curve
(:func:`experiments.verdicts.plateau_end`) and the numbers are measured after it: the exponent
q of ``||grad L|| ~ L^q`` (the form holds with one c > 0 when q <= 1) and the smallest ratio
``c = ||grad L|| / L``. A squared-error run of the first seed (its own step size) is kept
as a control, and the same squared-error problem solved to convergence by Levenberg-Marquardt
(:func:`ntk.theory.sensing.levenberg_marquardt`; at r = 1 the manifold dimension of the adapted
matrices is far above KN, so no threshold can show there). Writes ``runs/<name>/pl.json`` and
``plots/pl.png``.
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

from experiments import verdicts
from experiments.config import ExperimentConfig
from experiments.workbench import Workbench
from lora_jax import lora
from lora_jax.errors import ConfigError, UserError, user_message
from lora_jax.losses import get_loss
from ntk.theory import pl, sensing


@dataclasses.dataclass(frozen=True, kw_only=True)
class PLConfig:
    """The PL / Lojasiewicz check.

    Attributes:
      name: run directory name under ``out``.
      model: encoder (``minilm`` = the embedded MiniLM-L6).
      task: task name.
      seeds: few-shot sampling seeds (each also seeds its adapter init).
      k: examples per class.
      rank: LoRA rank.
      targets: LoRA target modules.
      layers: adapted layer indices (PEFT ``layers_to_transform``); empty = all layers.
      target_loss: a run stops once its cross-entropy is at most this.
      max_steps: the most full-batch gradient-descent steps per run.
      lr_ce: step size for cross-entropy.
      lr_mse: step size for the squared-error control.
      mse_steps: the most steps of the squared-error control (first seed; 0: not run).
      lm_iters: Levenberg-Marquardt iterations of the squared-error control solved to
        convergence on the linearized model (first seed, same start; 0: not run).
      exponent_tol: the form ``||grad L|| >= c L`` counts as holding when the exponent q of
        ``||grad L|| ~ L^q`` after the plateau is at most ``1 + exponent_tol``.
      max_length: token length.
      out: parent directory of run directories.
    """

    name: str = "pl"
    model: str = "minilm"
    task: str = "mr"
    seeds: tuple[int, ...] = (13, 21, 42, 87, 100, 1, 2, 3, 4, 5)
    k: int = 16
    rank: int = 1
    targets: str = "query|value"
    layers: tuple[int, ...] = (4, 5)
    target_loss: float = 1e-3
    max_steps: int = 8000
    lr_ce: float = 0.05
    lr_mse: float = 0.02
    mse_steps: int = 2000
    lm_iters: int = 40
    exponent_tol: float = 0.1
    max_length: int = 48
    out: str = "runs"

    def __post_init__(self):
        if (
            self.rank < 1
            or self.max_steps < 1
            or self.k < 1
            or not self.seeds
            or self.mse_steps < 0
            or self.lm_iters < 0
        ):
            raise ConfigError(
                f"rank, max_steps and k must be >= 1, mse_steps and lm_iters >= 0 and seeds "
                f"non-empty; got {self.rank}, {self.max_steps}, {self.k}, {self.mse_steps}, "
                f"{self.lm_iters}, {list(self.seeds)}."
            )
        if self.lr_ce <= 0 or self.lr_mse <= 0 or self.target_loss <= 0:
            raise ConfigError(
                f"learning rates and target_loss must be > 0; got {self.lr_ce}, {self.lr_mse}, "
                f"{self.target_loss}."
            )


def load_problem(
    model: str, task: str, seed: int, k: int, max_length: int, lcfg: lora.LoraConfig
) -> tuple:
    """``(problem, labels, output_fn, params)`` of the linearized LoRA model on train data."""
    bench = Workbench(ExperimentConfig(model=model, tasks=(task,), k=k, max_length=max_length))
    output_fn, params = bench.prompt_model(task)
    data = bench.data(task, seed, mode="prompt")
    problem = sensing.lora_jacobians(output_fn, params, lcfg, data.train)
    return problem, data.train["labels"], output_fn, params


def _gd(problem, labels, adapters0, loss_name: str, lr: float, steps: int, target: float):
    """GD on the linearized model until ``target``; a diverged run is retried at lr / 4."""
    loss = get_loss(loss_name)
    for _ in range(4):
        traj = pl.trajectory(
            lambda a, data, loss=loss: loss(sensing.outputs(data[0], a), data[1]),
            adapters0,
            (problem, labels),
            steps=steps,
            learning_rate=lr,
            stop_below=target,
        )
        if np.isfinite(traj.loss).all():
            break
        lr /= 4
    return traj, lr


def _thin(x: np.ndarray, points: int = 2000) -> list:
    """At most ``points`` values of a curve (log-spaced steps), as ``[step, value]`` pairs."""
    steps = np.unique(np.geomspace(1, len(x), points).astype(int) - 1)
    steps = np.union1d([0], steps)
    return [[int(t), float(x[t])] for t in steps]


def seed_numbers(loss: np.ndarray, grad_sq: np.ndarray, target: float) -> dict:
    """One run's numbers after its detected plateau (pure: numbers in, numbers out)."""
    grad = np.sqrt(grad_sq)
    start = verdicts.plateau_end(loss)
    tail = slice(start, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = grad[tail] / loss[tail]
    ratio = ratio[np.isfinite(ratio)]
    return {
        "steps": len(loss) - 1,
        "loss_start": float(loss[0]),
        "loss_end": float(loss[-1]),
        "plateau_end": start,
        "loss_at_plateau_end": float(loss[start]),
        "reached": bool(loss[-1] <= target),
        "stalled": verdicts.stalled(loss, target),
        "exponent": verdicts.lojasiewicz_exponent(loss[tail], grad[tail]),
        "c_min": float(ratio.min()) if ratio.size else None,
        "c_end": float(ratio[-1]) if ratio.size else None,
    }


def run(cfg: PLConfig, *, problem_cache: dict | None = None, resume: bool = True) -> dict:
    """Every seed's cross-entropy run, the squared-error control, the plot; returns the results.

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
    cache = problem_cache if problem_cache is not None else {}
    results: dict = {"config": dataclasses.asdict(cfg), "seeds": [], "jacobian_seconds": 0.0}
    for i, seed in enumerate(cfg.seeds):
        t0 = time.time()
        key = (cfg.model, cfg.task, seed, cfg.k, cfg.max_length, cfg.targets, cfg.layers)
        if key not in cache:
            cache[key] = load_problem(cfg.model, cfg.task, seed, cfg.k, cfg.max_length, lcfg)
        problem, labels, _, params = cache[key]
        results["jacobian_seconds"] += time.time() - t0
        adapters0 = lora.init(jax.random.key(seed), params, lcfg)
        t1 = time.time()
        traj, lr = _gd(problem, labels, adapters0, "ce", cfg.lr_ce, cfg.max_steps, cfg.target_loss)
        outputs = sensing.outputs(problem, traj.params)
        rec = {
            "seed": seed,
            "lr": lr,
            **seed_numbers(traj.loss, traj.grad_sq, cfg.target_loss),
            "train_accuracy": float(jnp.mean(jnp.argmax(outputs, -1) == labels)),
            # L* = 0 is certified when the update's own outputs classify every example.
            "l_star_certified": bool(jnp.all(jnp.argmax(outputs - problem.f0, -1) == labels)),
            "loss": _thin(traj.loss),
            "ratio": _thin(np.sqrt(traj.grad_sq) / np.maximum(traj.loss, 1e-300)),
            "seconds": time.time() - t1,
        }
        results["seeds"].append(rec)
        if i == 0 and cfg.mse_steps:  # the squared-error control on the first seed
            t1 = time.time()
            mse, lr = _gd(
                problem, labels, adapters0, "mse", cfg.lr_mse, cfg.mse_steps, cfg.target_loss
            )
            results["mse"] = {
                "seed": seed,
                "lr": lr,
                "steps": len(mse.loss) - 1,
                "loss_start": float(mse.loss[0]),
                "loss_end": float(mse.loss[-1]),
                "loss": _thin(mse.loss),
                "seconds": time.time() - t1,
            }
        if i == 0 and cfg.lm_iters:  # the squared-error problem solved to convergence
            t1 = time.time()
            targets = jax.nn.one_hot(labels, problem.f0.shape[1], dtype=problem.f0.dtype)
            losses, _ = sensing.levenberg_marquardt(problem, targets, adapters0, iters=cfg.lm_iters)
            dim = sum(
                cfg.rank * (j.shape[2] + j.shape[3]) - cfg.rank**2 for j in problem.jac.values()
            )
            results["mse_lm"] = {
                "seed": seed,
                "iters": cfg.lm_iters,
                "loss_start": float(losses[0]),
                "loss_end": float(losses[-1]),
                "loss": losses.tolist(),
                "dim": int(dim),
                "kn": int(problem.f0.size),
                "seconds": time.time() - t1,
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
    for i, r in enumerate(results["seeds"]):
        t, loss = np.array(r["loss"]).T
        ax1.loglog(t + 1, loss, color="C0", alpha=0.5, label="cross-entropy" if i == 0 else None)
        t, ratio = np.array(r["ratio"]).T
        ax2.loglog(t + 1, ratio, color="C0", alpha=0.5)
        ax2.axvline(r["plateau_end"] + 1, color="C0", lw=0.5, ls=":")
    if "mse" in results:
        t, loss = np.array(results["mse"]["loss"]).T
        ax1.loglog(t + 1, loss, color="C1", label="squared error (seed 1)")
    ax1.axhline(results["config"]["target_loss"], color="k", lw=0.8, ls="--")
    ax1.set_xlabel("GD step + 1")
    ax1.set_ylabel("training loss (L* = 0)")
    ax2.set_xlabel("GD step + 1")
    ax2.set_ylabel("c_t = |grad L| / L (dotted: plateau end)")
    cfg = results["config"]
    fig.suptitle(
        f"linearized LoRA, {cfg['task']} on {cfg['model']}, r = {cfg['rank']}, "
        f"{len(results['seeds'])} seeds"
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    fmt = lambda x: "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"  # noqa: E731
    lines = [
        "| seed | lr | steps | L start | plateau end (L there) | L end | reached target | "
        "stalled | q in grad ~ L^q after plateau | min grad/L after plateau | grad/L at end "
        "| train acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["seeds"]:
        lines.append(
            f"| {r['seed']} | {r['lr']:g} | {r['steps']} | {r['loss_start']:.4g} | "
            f"{r['plateau_end']} ({r['loss_at_plateau_end']:.3g}) | {r['loss_end']:.3g} | "
            f"{'yes' if r['reached'] else 'no'} | {'yes' if r['stalled'] else 'no'} | "
            f"{fmt(r['exponent'])} | {fmt(r['c_min'])} | {fmt(r['c_end'])} | "
            f"{100 * r['train_accuracy']:.0f}% |"
        )
    if "mse" in results:
        m = results["mse"]
        lines += [
            "",
            f"Squared-error control (seed {m['seed']}, lr {m['lr']:g}): loss {m['loss_start']:.4g}"
            f" -> {m['loss_end']:.3g} in {m['steps']} steps.",
        ]
    if "mse_lm" in results:
        m = results["mse_lm"]
        lines += [
            "",
            f"Squared error solved by Levenberg-Marquardt (seed {m['seed']}, manifold dimension "
            f"{m['dim']} against KN = {m['kn']}): loss {m['loss_start']:.4g} -> "
            f"{m['loss_end']:.3g} in {m['iters']} iterations.",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> PLConfig:
    """Maps the command line one-to-one onto :class:`PLConfig` fields."""
    parser = argparse.ArgumentParser(prog="python -m experiments.pl", description=__doc__)
    for field in dataclasses.fields(PLConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name in ("layers", "seeds"):
            parser.add_argument(flag, nargs="*" if field.name == "layers" else "+", type=int)
            continue
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(flag, type=kind)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return PLConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ConfigError as err:
        parser.error(user_message(err))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        results = run(cfg)
    except UserError as err:  # bad input: one line; a bug keeps its traceback
        raise SystemExit(f"error: {user_message(err)}") from err
    print(markdown(results))
    print(f"plot: {results['plot']} ({results['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
