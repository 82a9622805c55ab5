"""How lazy real LoRA fine-tuning is, per rank: ``python -m experiments.lazy [--ranks 1 4 12]``.

The guarantees of the paper hold for the model linearized in the base weights at W0. Per rank,
this fine-tunes real LoRA (the rank sweep's settings: :func:`experiments.jobs.train_config`,
:func:`experiments.jobs.lora_config`, the best-dev adapters) and measures, on the training
examples:

* the weight-space linearization error ``||f(W0 + dW) - f_lin(dW)|| / ||f(W0 + dW) - f(W0)||``
  with ``f_lin(dW) = f(W0) + J(W0) dW`` (:func:`ntk.lora_linearized_model_fn`): 0 in the NTK
  regime, about 1 or more far from it;
* the relative weight change ``||dW|| / ||W0||`` over the adapted kernels (``dW = scale A B``);
* the movement of the weight-space kernel ``J(W) J(W)^T`` from W0 to ``W0 + dW`` (the kernel
  the linearization freezes), and beside it the movement of the adapter kernel (the eNTK in
  the LoRA factors), which is dominated by the B = 0 start (it is rank-deficient there) and so
  says little about laziness.

Kernel movements are :func:`ntk.kernel_distance` (``relative_change``, ``alignment``). Writes
``runs/<name>/lazy.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

import ntk
from experiments import cli, jobs, outputs
from experiments.config import ExperimentConfig
from experiments.workbench import Workbench
from lora_jax import lora, train
from lora_jax.errors import ConfigError
from lora_jax.trainable import Method, make_model_fn
from ntk.theory import sensing


@dataclasses.dataclass(frozen=True, kw_only=True)
class LazyConfig:
    """The per-rank laziness check.

    Attributes:
      name: run directory name under ``out``.
      model: encoder (``minilm`` = the embedded MiniLM-L6).
      task: task name.
      ranks: LoRA ranks.
      seeds: few-shot seeds (each also seeds training).
      k: examples per class.
      steps: training steps (as the sweep).
      lr: learning rate (as the sweep).
      max_length: token length.
      out: parent directory of run directories.
    """

    name: str = "lazy"
    model: str = "minilm"
    task: str = "mr"
    ranks: tuple[int, ...] = (1, 4, 12)
    seeds: tuple[int, ...] = (13,)
    k: int = 16
    steps: int = ExperimentConfig.steps
    lr: float = ExperimentConfig.lr
    max_length: int = 48
    out: str = "runs"

    def __post_init__(self):
        if not self.ranks or min(self.ranks) < 1 or not self.seeds or self.steps < 1:
            raise ConfigError(
                f"ranks (>= 1) and seeds must be non-empty and steps >= 1; got "
                f"{list(self.ranks)}, {list(self.seeds)}, {self.steps}."
            )


def linearization_error(y: np.ndarray, y_lin: np.ndarray, y0: np.ndarray) -> float:
    """``||y - y_lin|| / ||y - y0||`` (0 / 0 = 0): the part of the change the linear model
    misses, relative to the change."""
    change = float(np.linalg.norm(np.asarray(y, np.float64) - y0))
    miss = float(np.linalg.norm(np.asarray(y, np.float64) - y_lin))
    return miss / change if change > 0 else 0.0


def weight_change(w0: dict, delta: dict) -> float:
    """``||dW|| / ||W0||`` over the given leaves (flat dicts of arrays)."""
    num = sum(float(np.sum(np.asarray(d, np.float64) ** 2)) for d in delta.values())
    den = sum(float(np.sum(np.asarray(w0[key], np.float64) ** 2)) for key in delta)
    return float(np.sqrt(num / den))


def measure(output_fn, params, lcfg: lora.LoraConfig, adapters0, adapters, batch) -> dict:
    """The laziness numbers of one trained run on ``batch`` (see the module docstring)."""
    merged = lora.apply(params, adapters, lcfg)
    y0 = np.asarray(output_fn(params, batch), np.float64)
    y = np.asarray(output_fn(merged, batch), np.float64)
    y_lin = np.asarray(ntk.lora_linearized_model_fn(output_fn, lcfg)(adapters, params, batch))
    w0, delta = ntk.lora_weight_delta(params, adapters, lcfg)
    k_w0 = sensing.gram(sensing.lora_jacobians(output_fn, params, lcfg, batch))
    k_w1 = sensing.gram(sensing.lora_jacobians(output_fn, merged, lcfg, batch))
    f, _, info = ntk.lora_kernel_model(output_fn, params, adapters0, lcfg)
    ntk_fn = ntk.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, model_info=info)
    k_a0 = ntk.kernel_matrix(np.asarray(ntk_fn(batch, None, adapters0)))
    k_a1 = ntk.kernel_matrix(np.asarray(ntk_fn(batch, None, adapters)))
    return {
        "linearization_error": linearization_error(y, y_lin, y0),
        "output_change": float(np.linalg.norm(y - y0) / np.linalg.norm(y0)),
        "weight_change": weight_change(w0, delta),
        "weight_kernel": ntk.kernel_distance(k_w0, k_w1),
        "adapter_kernel": ntk.kernel_distance(k_a0, k_a1),
    }


def run(cfg: LazyConfig, *, resume: bool = True) -> dict:
    """Every (rank, seed): fine-tune, then :func:`measure` on the training examples."""
    start = time.time()
    run_dir = os.path.join(cfg.out, cfg.name)
    saved = os.path.join(run_dir, "lazy.json")
    if resume and (results := outputs.saved_results(saved, cfg)) is not None:
        return results
    ecfg = ExperimentConfig(model=cfg.model, tasks=(cfg.task,), k=cfg.k, steps=cfg.steps,
                            lr=cfg.lr, max_length=cfg.max_length, ranks=cfg.ranks,
                            seeds=cfg.seeds)  # fmt: skip
    bench = Workbench(ecfg)
    output_fn, params = bench.prompt_model(cfg.task)
    rows = []
    for seed in cfg.seeds:
        data = bench.data(cfg.task, seed, mode="prompt")
        for rank in cfg.ranks:
            t0 = time.time()
            cell = jobs.Cell(cfg.task, "lora", rank, seed)
            lcfg = jobs.lora_config(ecfg, rank, bench.model_type)
            tcfg = jobs.train_config(ecfg, cell)
            adapters0 = lora.init(jax.random.key(seed), params, lcfg)
            model_fn = make_model_fn(output_fn, Method.LORA, lora_config=lcfg)
            state = train.init_state(adapters0, train.make_optimizer(tcfg), tcfg.seed)
            fit = train.fit(model_fn, state, params, data.train, data.dev, tcfg, progress=False)
            numbers = measure(output_fn, params, lcfg, adapters0, fit.best_trainable, data.train)
            rows.append({"rank": rank, "seed": seed, "best_step": fit.best_step,
                         "dev_accuracy": fit.best_dev_accuracy, **numbers,
                         "seconds": time.time() - t0})  # fmt: skip
            print(f"lazy: r = {rank}, seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr)
    results = {"config": dataclasses.asdict(cfg), "rows": rows, "seconds": time.time() - start}
    os.makedirs(run_dir, exist_ok=True)
    with open(saved + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(saved + ".tmp", saved)
    return results


def markdown(results: dict) -> str:
    lines = [
        "| rank | seed | best step | linearization error (weights) | output change | "
        "weight change ||dW|| / ||W0|| | weight-kernel change (alignment) | adapter-kernel "
        "change (alignment) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        wk, ak = r["weight_kernel"], r["adapter_kernel"]
        lines.append(
            f"| {r['rank']} | {r['seed']} | {r['best_step']} | {r['linearization_error']:.3g} | "
            f"{r['output_change']:.3g} | {r['weight_change']:.3g} | "
            f"{wk['relative_change']:.3g} ({wk['alignment']:.4f}) | "
            f"{ak['relative_change']:.3g} ({ak['alignment']:.4f}) |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> LazyConfig:
    """Maps the command line one-to-one onto :class:`LazyConfig` fields."""
    return cli.parse_config(
        LazyConfig,
        argv,
        prog="python -m experiments.lazy",
        description=__doc__,
        lists={"ranks": {"nargs": "+", "type": int}, "seeds": {"nargs": "+", "type": int}},
    )


def main(argv: list[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
