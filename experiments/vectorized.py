"""The LoRA cells of one task (ranks x seeds) trained as one vectorized job (``lora_jax.sweep``).

``run.py`` hands each job here: a list of LoRA cells of one task, at most
``ExperimentConfig.members`` long. The job trains every cell's adapters on the shared frozen
encoder in one compiled program (fused LoRA path: each base GEMM runs once for all members'
rows), then writes the same results record per cell as a sequential cell does. A stopped job
resumes from its orbax checkpoint, named by the cells it holds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from experiments import ntk_analysis
from experiments.config import ExperimentConfig
from experiments.workbench import Workbench
from lora_jax import sweep
from lora_jax.trainable import Method, make_model_fn


def members_per_job(cfg: ExperimentConfig, mesh: Any = None) -> int:
    """The ``members`` cap of vectorized jobs for this run, or 0 (one cell at a time).

    Vectorized jobs run on one device of one process and do not save adapters yet, so runs on
    a mesh, on several processes or with ``save_adapters`` train one cell at a time (and say so).
    """
    if not cfg.vectorize:
        return 0
    reasons = [
        why
        for why, on in (
            ("a mesh", mesh is not None),
            ("several processes", jax.process_count() > 1),
            ("--save-adapters", cfg.save_adapters),
        )
        if on
    ]
    if reasons:
        print(
            f"note: LoRA cells train one at a time (vectorized jobs do not support "
            f"{' or '.join(reasons)} yet).",
            file=sys.stderr,
        )
        return 0
    return cfg.members


def plan_jobs(cells: Sequence[Any], members: int) -> list[list[Any]]:
    """Groups ``cells`` (in order) into jobs: the LoRA cells of one task, at most ``members``
    per job, and every other cell on its own. ``members=0``: every cell on its own.

    A task's LoRA cells are split into as few jobs as the cap allows, of sizes as even as
    possible (30 cells under a cap of 16 run as two jobs of 15, which share one program).
    """
    jobs: list[list[Any]] = []
    lora: dict[str, list] = {}  # task -> its LoRA cells (one entry of ``jobs``)
    for cell in cells:
        if members and cell.method == "lora":
            if cell.task not in lora:
                lora[cell.task] = []
                jobs.append(lora[cell.task])
            lora[cell.task].append(cell)
        else:
            jobs.append([cell])
    return [part for job in jobs for part in _split(job, members)]


def _split(job: list, members: int) -> list[list]:
    if not members or job[0].method != "lora":
        return [job]
    size = -(-len(job) // -(-len(job) // members))  # ceil(len / number of jobs)
    return [job[i : i + size] for i in range(0, len(job), size)]


def run_lora_job(
    bench: Workbench,
    cfg: ExperimentConfig,
    cells: Sequence[Any],
    run_dir: str,
    *,
    train_config: Callable,
    lora_config: Callable,
) -> list[dict]:
    """Trains and tests the LoRA ``cells`` (one task) as one job; returns one record per cell.

    ``train_config(cfg, cell)`` and ``lora_config(cfg, rank, model_type)`` are ``run.py`` 's, so
    each member has exactly the settings its sequential cell would have.
    """
    start = time.time()
    (task,) = {c.task for c in cells}
    output_fn, params = bench.prompt_model(task)
    datas = bench.job_data(task, [c.seed for c in cells], mode="prompt")  # one T per split
    configs = [lora_config(cfg, c.rank, bench.model_type) for c in cells]
    tcfgs = [train_config(cfg, c) for c in cells]
    plan = sweep.plan_lora(params, configs)
    seeds = [t.seed for t in tcfgs]
    adapters0 = sweep.init_lora(params, plan, seeds)
    state = sweep.init_states(adapters0, tcfgs[0], [t.learning_rate for t in tcfgs], seeds)
    model_fn = bench.memo(
        ("sweep_model_fn", task, plan.config),
        lambda: sweep.lora_model_fn(
            make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fused=True)
        ),
    )
    names = [c.key.replace("/", "_") for c in cells]
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]
    ckpt_dir = os.path.join(run_dir, "ckpt", f"{task}_lora_job_{digest}")
    metrics = [os.path.join(run_dir, "metrics", name + ".jsonl") for name in names]
    os.makedirs(os.path.dirname(metrics[0]), exist_ok=True)
    pack = cfg.pack and model_fn.packs_rows
    results = sweep.fit(
        model_fn,
        state,
        params,
        [d.train for d in datas],
        [d.dev for d in datas],
        tcfgs[0],
        member_inputs=plan.factors,
        checkpoint_dir=ckpt_dir,
        metrics_paths=metrics,
        progress=f"{task} lora x{len(cells)}",
        pack=pack,
    )
    best = sweep.stack([r.best_trainable for r in results])
    shared_test = all(d.test is datas[0].test for d in datas)
    predict = sweep.programs(
        model_fn, tcfgs[0], member_inputs=True, shared_data=shared_test
    ).predict
    test_data = datas[0].test if shared_test else sweep.stack([d.test for d in datas])
    if pack:
        predict = functools.partial(predict, pack=True)
    test = sweep.evaluate(predict, best, (params, plan.factors), test_data)["accuracy"]

    records = []
    for i, (cell, result) in enumerate(zip(cells, results, strict=True)):
        initial = sweep.unpad(plan, sweep.member(adapters0, i), i)
        record = {"task": cell.task, "method": cell.method, "rank": cell.rank, "seed": cell.seed}
        if cfg.ntk:
            record.update(
                ntk_analysis.analyze(
                    cell=cell,
                    output_fn=output_fn,
                    params=params,
                    lora_config=configs[i],
                    adapters0=initial,
                    adapters=sweep.unpad(plan, result.best_trainable, i),
                    data=datas[i],
                    tcfg=tcfgs[i],
                    model_fn_cache=bench.memo,
                    run_dir=run_dir,
                )
            )
        record.update(
            dev_accuracy=result.best_dev_accuracy,
            test_accuracy=float(test[i]),
            best_step=result.best_step,
            trainable_params=int(sum(np.size(x) for x in _leaves(initial))),
            seconds=(time.time() - start) / len(cells),  # the job's time, shared out
        )
        records.append(record)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return records


def _leaves(adapters: dict) -> list:
    return [x for leaves in adapters.values() for x in leaves.values()]
