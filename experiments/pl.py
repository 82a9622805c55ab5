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

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, verdicts
from experiments import outputs as results_io
from experiments.config import ExperimentConfig
from experiments.workbench import Workbench
from lora_jax import lora
from lora_jax.errors import ConfigError
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
      kernel_points: log-spaced steps per run at which the LoRA tangent kernel is evaluated
        (0: not evaluated).
      kernel_tol: the kernel counts as nonsingular when ``lam_min / lam_max`` exceeds this.
      below_k: examples per class of the squared-error control below the threshold (one
        matrix, ``dim(r) < KN`` at r = 1; 0: not run).
      below_targets: the one adapted module of that control.
      below_layers: its layer.
      below_ranks: its Levenberg-Marquardt ranks (e.g. 1 with dim < KN and 2 with dim > KN).
      below_ce_steps: the most cross-entropy GD steps at r = 1 on that problem.
      zero_tol: a Levenberg-Marquardt control fits when its loss falls to at most this share
        of its start.
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
    kernel_points: int = 40
    kernel_tol: float = 1e-6
    below_k: int = 256
    below_targets: str = "query"
    below_layers: tuple[int, ...] = (5,)
    below_ranks: tuple[int, ...] = (1, 2)
    below_ce_steps: int = 3000
    zero_tol: float = 1e-4
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
            or self.kernel_points < 0
            or self.below_k < 0
            or self.below_ce_steps < 0
            or any(r < 1 for r in self.below_ranks)
        ):
            raise ConfigError(
                f"rank, max_steps, k and below_ranks must be >= 1, mse_steps, lm_iters, "
                f"kernel_points, below_k and below_ce_steps >= 0 and seeds non-empty; got "
                f"{self.rank}, {self.max_steps}, {self.k}, {list(self.below_ranks)}, "
                f"{self.mse_steps}, {self.lm_iters}, {self.kernel_points}, {self.below_k}, "
                f"{self.below_ce_steps}, {list(self.seeds)}."
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


def _gd(
    problem, labels, adapters0, loss_name: str, lr: float, steps: int, target: float,
    keep_steps=(),
):  # fmt: skip
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
            keep_steps=keep_steps,
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


def log_steps(steps: int, points: int) -> list[int]:
    """About ``points`` log-spaced steps in ``[0, steps]`` (0 and ``steps`` included)."""
    if points < 1:
        return []
    inner = np.geomspace(1, steps + 1, points).astype(int) - 1
    return sorted({0, steps, *inner.tolist()})


def kernel_along(problem: sensing.SensingProblem, labels, steps, kept) -> list[dict]:
    """The LoRA tangent kernel at the kept iterates of a cross-entropy run.

    Per step: ``lam_min`` / ``lam_max`` of the kernel on cross-entropy's residual subspace
    (:func:`ntk.theory.sensing.residual_subspace_eigvals`), the loss L and the lower bound
    the kernel gives on ``||grad L|| / L``: ``c_kernel = sqrt(lam_min) ||p - y|| / (N L)``.
    """
    n, k = problem.f0.shape
    rows = []
    for i, t in enumerate(np.asarray(steps).tolist()):
        a = jax.tree.map(lambda x, i=i: x[i], kept)
        eig = sensing.residual_subspace_eigvals(sensing.tangent_kernel(problem, a), k)
        out = np.asarray(sensing.outputs(problem, a), np.float64)
        logp = out - np.logaddexp.reduce(out, axis=1, keepdims=True)
        y = np.eye(k)[np.asarray(labels)]
        loss = float(-np.mean(np.sum(y * logp, axis=1)))
        resid = float(np.linalg.norm(np.exp(logp) - y))
        lam_min = max(float(eig[0]), 0.0)
        rows.append({
            "step": int(t), "lam_min": float(eig[0]), "lam_max": float(eig[-1]), "loss": loss,
            "c_kernel": float(np.sqrt(lam_min) * resid / (n * loss)) if loss > 0 else None,
        })  # fmt: skip
    return rows


def kernel_numbers(rows: list[dict], plateau_end: int) -> dict:
    """The kernel's numbers after the plateau (pure): the smallest ``lam_min / lam_max``, the
    smallest ``lam_min`` and the smallest bound ``c_kernel`` over the logged steps there
    (the last logged step before the plateau's end included, so a run that never left it
    still has one). None when no step was logged."""
    after = [r for r in rows if r["step"] >= plateau_end]
    before = [r for r in rows if r["step"] < plateau_end]
    use = before[-1:] + after
    if not use:
        return {"kernel_rel_min": None, "kernel_lam_min": None, "c_kernel_min": None}
    rel = [r["lam_min"] / r["lam_max"] if r["lam_max"] > 0 else 0.0 for r in use]
    cs = [r["c_kernel"] for r in use if r["c_kernel"] is not None]
    return {
        "kernel_rel_min": float(min(rel)),
        "kernel_lam_min": float(min(r["lam_min"] for r in use)),
        "c_kernel_min": float(min(cs)) if cs else None,
    }


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
    instead of recomputing, and a stopped run goes on after its last finished seed (each seed
    is saved to ``pl.partial.json`` as it ends: a seed to L <= 1e-3 can take many minutes).
    """
    start = time.time()
    run_dir = os.path.join(cfg.out, cfg.name)
    saved = os.path.join(run_dir, "pl.json")
    partial = os.path.join(run_dir, "pl.partial.json")
    if resume and (results := results_io.saved_results(saved, cfg)) is not None:
        return results
    lcfg = lora.LoraConfig(
        r=cfg.rank, alpha=2.0 * cfg.rank, targets=cfg.targets, layers=cfg.layers or None
    )
    cache = problem_cache if problem_cache is not None else {}
    results: dict = {"config": dataclasses.asdict(cfg), "seeds": [], "jacobian_seconds": 0.0}
    if resume and (earlier := results_io.saved_results(partial, cfg)) is not None:
        results = earlier
    done = {rec["seed"] for rec in results["seeds"]}
    for i, seed in enumerate(cfg.seeds):
        if seed in done:
            continue
        t0 = time.time()
        key = (cfg.model, cfg.task, seed, cfg.k, cfg.max_length, cfg.targets, cfg.layers)
        if key not in cache:
            cache[key] = load_problem(cfg.model, cfg.task, seed, cfg.k, cfg.max_length, lcfg)
        problem, labels, _, params = cache[key]
        results["jacobian_seconds"] += time.time() - t0
        adapters0 = lora.init(jax.random.key(seed), params, lcfg)
        t1 = time.time()
        keep = log_steps(cfg.max_steps, cfg.kernel_points)
        traj, lr = _gd(
            problem, labels, adapters0, "ce", cfg.lr_ce, cfg.max_steps, cfg.target_loss, keep
        )
        outputs = sensing.outputs(problem, traj.params)
        numbers = seed_numbers(traj.loss, traj.grad_sq, cfg.target_loss)
        kernel = kernel_along(problem, labels, traj.kept_steps, traj.kept) if keep else []
        rec = {
            "seed": seed,
            "lr": lr,
            **numbers,
            **kernel_numbers(kernel, numbers["plateau_end"]),
            "kernel": kernel,
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
                "rank": cfg.rank,
                "targets": cfg.targets,
                "layers": list(cfg.layers),
                "iters": cfg.lm_iters,
                "loss_start": float(losses[0]),
                "loss_end": float(losses[-1]),
                "loss": losses.tolist(),
                "dim": int(dim),
                "kn": int(problem.f0.size),
                "seconds": time.time() - t1,
            }
        results_io.save_results(partial, results)
    if cfg.below_k:
        results["below"] = below_threshold(cfg)
    results["regimes"] = [results["mse_lm"]] if "mse_lm" in results else []
    results["regimes"] += results.get("below", {}).get("lm", [])
    os.makedirs(run_dir, exist_ok=True)
    results["plot"] = plot(results, os.path.join(run_dir, "plots", "pl.png"))
    results["seconds"] = time.time() - start
    results_io.save_results(saved, results)
    if os.path.exists(partial):
        os.remove(partial)
    return results


def manifold_dim(problem: sensing.SensingProblem, rank: int) -> int:
    """``sum_l r (m_l + n_l) - r^2`` over the adapted matrices of ``problem``."""
    return int(sum(rank * (j.shape[2] + j.shape[3]) - rank**2 for j in problem.jac.values()))


def below_threshold(cfg: PLConfig) -> dict:
    """The controls where squared error must show its threshold: one adapted matrix and
    ``below_k`` examples per class (the first seed), so that ``dim(r = 1) < KN``.

    Levenberg-Marquardt on the squared error at each of ``below_ranks`` (``lm_iters`` iterations
    each, from the rank's LoRA init), and cross-entropy GD at r = 1 (``below_ce_steps``).
    """
    seed = cfg.seeds[0]
    lcfg = lora.LoraConfig(
        r=1,
        alpha=2.0,
        targets=cfg.below_targets,
        layers=cfg.below_layers or None,
    )
    t0 = time.time()
    problem, labels, _, params = load_problem(
        cfg.model, cfg.task, seed, cfg.below_k, cfg.max_length, lcfg
    )
    out: dict = {"seed": seed, "k": cfg.below_k, "jacobian_seconds": time.time() - t0, "lm": []}
    n, k = problem.f0.shape
    targets = jax.nn.one_hot(labels, k, dtype=problem.f0.dtype)
    for rank in cfg.below_ranks:
        t1 = time.time()
        rcfg = dataclasses.replace(lcfg, r=rank, alpha=2.0 * rank)
        adapters0 = lora.init(jax.random.key(seed), params, rcfg)
        losses, _ = sensing.levenberg_marquardt(problem, targets, adapters0, iters=cfg.lm_iters)
        out["lm"].append({
            "seed": seed, "rank": rank, "targets": cfg.below_targets,
            "layers": list(cfg.below_layers), "iters": cfg.lm_iters,
            "loss_start": float(losses[0]), "loss_end": float(losses[-1]),
            "loss": losses.tolist(), "dim": manifold_dim(problem, rank), "kn": int(n * k),
            "seconds": time.time() - t1,
        })  # fmt: skip
    if cfg.below_ce_steps:
        t1 = time.time()
        adapters0 = lora.init(jax.random.key(seed), params, lcfg)
        traj, lr = _gd(
            problem, labels, adapters0, "ce", cfg.lr_ce, cfg.below_ce_steps, cfg.target_loss
        )
        outputs = sensing.outputs(problem, traj.params)
        out["ce"] = {
            "lr": lr,
            **seed_numbers(traj.loss, traj.grad_sq, cfg.target_loss),
            "dim": manifold_dim(problem, 1),
            "kn": int(n * k),
            "train_accuracy": float(jnp.mean(jnp.argmax(outputs, -1) == labels)),
            "separated": bool(jnp.all(jnp.argmax(outputs - problem.f0, -1) == labels)),
            "loss": _thin(traj.loss),
            "seconds": time.time() - t1,
        }
    return out


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
        "| train acc | kernel min lam_min / lam_max after plateau | kernel bound on grad/L |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["seeds"]:
        lines.append(
            f"| {r['seed']} | {r['lr']:g} | {r['steps']} | {r['loss_start']:.4g} | "
            f"{r['plateau_end']} ({r['loss_at_plateau_end']:.3g}) | {r['loss_end']:.3g} | "
            f"{'yes' if r['reached'] else 'no'} | {'yes' if r['stalled'] else 'no'} | "
            f"{fmt(r['exponent'])} | {fmt(r['c_min'])} | {fmt(r['c_end'])} | "
            f"{100 * r['train_accuracy']:.0f}% | {fmt(r.get('kernel_rel_min'))} | "
            f"{fmt(r.get('c_kernel_min'))} |"
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
    if "below" in results:
        b = results["below"]
        lines += ["", f"Below the threshold (seed {b['seed']}, {b['k']} examples per class, one "
                  "matrix), Levenberg-Marquardt on the squared error:"]  # fmt: skip
        for m in b["lm"]:
            side = "above" if m["dim"] > m["kn"] else "below"
            lines.append(
                f"- r = {m['rank']} on {m['targets']} of layer(s) {m['layers']}: dim "
                f"{m['dim']} {side} KN = {m['kn']}, loss {m['loss_start']:.4g} -> "
                f"{m['loss_end']:.3g} in {m['iters']} iterations."
            )
        if "ce" in b:
            c = b["ce"]
            lines.append(
                f"- cross-entropy GD at r = 1 there (dim {c['dim']}, KN = {c['kn']}, lr "
                f"{c['lr']:g}): {c['loss_start']:.4g} -> {c['loss_end']:.3g} in {c['steps']} "
                f"steps, reached: {'yes' if c['reached'] else 'no'}, stalled: "
                f"{'yes' if c['stalled'] else 'no'}, train accuracy "
                f"{100 * c['train_accuracy']:.0f}%, separated by the update: "
                f"{'yes' if c['separated'] else 'no'}."
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> PLConfig:
    """Maps the command line one-to-one onto :class:`PLConfig` fields."""
    return cli.parse_config(
        PLConfig,
        argv,
        prog="python -m experiments.pl",
        description=__doc__,
        lists={
            "layers": {"nargs": "*", "type": int},
            "below_layers": {"nargs": "*", "type": int},
            "seeds": {"nargs": "+", "type": int},
            "below_ranks": {"nargs": "+", "type": int},
        },
    )


def main(argv: list[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run, markdown, footer="plot: {plot} ")


if __name__ == "__main__":
    main()
