"""The cells of an experiment and the one function that runs them: a job of cells.

A cell is one results line (task x method x rank x seed). Cells run in jobs: the LoRA cells of
a task (ranks x seeds), and of every other task of the same shape (K label words, examples
and padded lengths: :meth:`experiments.workbench.Workbench.job_shape`), form jobs of up to
``ExperimentConfig.members`` members, each trained as one vectorized program
(``lora_jax.train.fit_job``; fused LoRA path: each base GEMM runs once for all members' rows);
every other cell is a job of one. Prompt models take their label words as an argument of the
compiled programs (``lora_jax.trainable.label_words_as_inputs``, one ``[K]`` row per member),
so tasks of one shape share a program, and a job may hold several tasks. :func:`run_job`
trains a job, tests each member's best parameters (each on its own task's test set), and
writes the same results record per cell whatever the job's size (:func:`cell_record`). A
stopped job resumes from its orbax checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import ntk_analysis, outputs
from experiments.config import ExperimentConfig
from experiments.workbench import TaskData, Workbench
from lora_jax import distributed, lora, members, programs, train
from lora_jax.capabilities import capabilities_of
from lora_jax.trainable import Method, label_words_as_inputs, make_model_fn, split_params

PyTree = Any


class Cell(NamedTuple):
    """One unit of work: one training run (or one evaluation) and one results line."""

    task: str
    method: str
    rank: int | None
    seed: int

    @property
    def key(self) -> str:
        label = f"{self.method}-r{self.rank}" if self.rank else self.method
        return f"{self.task}/{label}/seed{self.seed}"


def cells(cfg: ExperimentConfig, task_names: tuple[str, ...] | None = None) -> list[Cell]:
    """All cells, grouped so that cells sharing a compiled program run back to back.

    ``task_names`` default to ``cfg.tasks``; ``run`` passes those of the task files too.
    """
    return [
        Cell(task, method, rank, seed)
        for task in (cfg.tasks if task_names is None else task_names)
        for method in cfg.methods
        for rank in (cfg.ranks if method == "lora" else (None,))
        for seed in cfg.seeds
    ]


def train_config(cfg: ExperimentConfig, cell: Cell) -> train.TrainConfig:
    """The training hyperparameters of ``cell``."""
    lr = cfg.head_lr if cell.method == "head" else cfg.lr
    return train.TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=lr,
        loss=cfg.loss,
        eval_every=cfg.eval_every,
        grad_accum=cfg.grad_accum,
        train_dropout=cfg.train_dropout,
        seed=cell.seed,
    )


def lora_config(cfg: ExperimentConfig, rank: int, model_type: str) -> lora.LoraConfig:
    """The LoRA config of a cell of rank ``rank`` on an encoder of ``model_type``."""
    alpha = cfg.alpha if cfg.alpha is not None else 2.0 * rank
    targets = lora.default_targets(model_type) if cfg.targets == "auto" else cfg.targets
    return lora.LoraConfig(r=rank, alpha=alpha, targets=targets, dropout=cfg.lora_dropout)


def members_per_job(cfg: ExperimentConfig) -> int:
    """The ``members`` cap of LoRA jobs for this run, or 0 (every cell a job of one).

    On a mesh, on one process or several, a job's members are split over the devices
    (``lora_jax.train.fit_job``), so the cap holds there too.
    """
    return cfg.members if cfg.vectorize else 0


def plan_jobs(
    cells: Sequence[Cell], members: int, shape_of: Callable[[str], Hashable] | None = None
) -> list[list[Cell]]:
    """Groups ``cells`` (in order) into jobs: the LoRA cells of tasks of one shape, at most
    ``members`` per job, and every other cell on its own. ``members=0``: every cell on its own.

    ``shape_of(task)`` is what must agree for two tasks' cells to share a job (``run`` passes
    :meth:`~experiments.workbench.Workbench.job_shape`); default: the task itself (a job holds
    one task). The LoRA cells of one shape (the tasks in order of first appearance) are split
    into as few jobs as the cap allows, of sizes as even as possible (30 cells under a cap of
    16 run as two jobs of 15, which share one program).
    """
    shape = (lambda task: task) if shape_of is None else shape_of
    jobs: list[list[Cell]] = []
    lora_jobs: dict[Hashable, list] = {}  # shape -> its LoRA cells (one entry of ``jobs``)
    for cell in cells:
        if members and cell.method == "lora":
            key = shape(cell.task)
            if key not in lora_jobs:
                lora_jobs[key] = []
                jobs.append(lora_jobs[key])
            lora_jobs[key].append(cell)
        else:
            jobs.append([cell])
    return [part for job in jobs for part in _split(job, members)]


def _split(job: list, members: int) -> list[list]:
    if not members or job[0].method != "lora":
        return [job]
    size = -(-len(job) // -(-len(job) // members))  # ceil(len / number of jobs)
    return [job[i : i + size] for i in range(0, len(job), size)]


class Job(NamedTuple):
    """What :func:`run_job` trains: a model over stacked members and their data."""

    model_fn: train.ModelFn
    output_fns: list[Any]  # per member, its task's readout with fixed label words (ntk analysis)
    params: PyTree  # the whole pretrained model
    frozen: PyTree
    # Prompt jobs: (label word ids [n, K], lora.StackPlan.factors or None); head jobs: None.
    member_inputs: PyTree | None
    trainables: PyTree  # initial trainable parameters, leaves [n, ...]
    initial: list[PyTree]  # per member, its own initial trainable parameters (unpadded)
    lora_configs: list[lora.LoraConfig | None]
    plan: lora.StackPlan | None
    datas: list[TaskData]  # per member; train / dev of one shape, the test split shared


def build_job(bench: Workbench, cfg: ExperimentConfig, job: Sequence[Cell]) -> Job:
    """The model, initial parameters and data of ``job`` (cells of one method; LoRA cells may
    be of several tasks of one shape)."""
    cell = job[0]
    method = Method(cell.method)
    if method == Method.HEAD:  # a job of one: the head over cached features
        output_fn, params, data = bench.cls_head_model(cell.task, cell.seed)
        model_fn = bench.memo(
            ("model_fn", cell.task, method), lambda: make_model_fn(output_fn, method)
        )
        trainable, frozen = split_params(params, method)
        return Job(
            model_fn, [output_fn], params, frozen, None, members.stack([trainable]),
            [trainable], [None], None, [data],
        )  # fmt: skip
    # Prompt models: one program for every task, the label words an argument of it.
    output_fn, params = bench.prompt_model_at_call()
    output_fns = [bench.prompt_model(c.task)[0] for c in job]
    datas = bench.cells_data([(c.task, c.seed) for c in job], mode="prompt")
    words = jnp.asarray(np.stack([bench.label_word_ids(c.task) for c in job]), jnp.int32)
    if method != Method.LORA:
        (only,) = job
        model_fn = bench.memo(
            ("model_fn", method),
            lambda: label_words_as_inputs(make_model_fn(output_fn, method)),
        )
        trainable, frozen = split_params(params, method)
        return Job(
            model_fn, output_fns, params, frozen, (words, None), members.stack([trainable]),
            [trainable], [None], None, datas,
        )  # fmt: skip
    configs = [lora_config(cfg, c.rank, bench.model_type) for c in job]
    plan = lora.plan_stack(params, configs)
    # Several members share each base GEMM on the fused path; one alone takes the faster path.
    fusion = lora.Fusion.FUSED if len(job) > 1 else lora.Fusion.AUTO

    def build():
        fn = make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion=fusion)
        return label_words_as_inputs(fn if plan.factors is None else lora.with_member_factors(fn))

    factors = plan.factors is not None
    model_fn = bench.memo(("model_fn", method, plan.config, fusion, factors), build)
    trainables = lora.init_stack(params, plan, [c.seed for c in job])
    initial = [lora.unpad(plan, members.member(trainables, i), i) for i in range(len(job))]
    return Job(
        model_fn, output_fns, params, params, (words, plan.factors), trainables, initial,
        configs, plan, datas,
    )  # fmt: skip


def task_pack_length(bench: Workbench, cfg: ExperimentConfig, task: str, model_fn) -> int | None:
    """The packed length of ``task`` 's training batches (``lora_jax.packing``), or None.

    The longest batch any seed of the task draws, so that the task's jobs share one compiled
    chunk, as they do unpacked (a job of several tasks packs to the longest of theirs).
    """
    if not (cfg.pack and capabilities_of(model_fn).packs_rows):
        return None

    def longest() -> int:
        return max(
            programs.pack_length_needed(
                model_fn,
                jax.random.key_data(jax.random.key(seed)),  # train.init_state's rng
                cfg.steps,
                bench.data(task, seed, mode="prompt").train,
                cfg.batch_size,
            )
            for seed in cfg.seeds
        )

    return bench.memo(("pack_length", task), longest)


def job_name(job: Sequence[Cell]) -> str:
    """The file name of a job (its checkpoint directory): the cell's, or the cells' digest."""
    names = [outputs.cell_dir_name(c.key) for c in job]
    if len(names) == 1:
        return names[0]
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]
    return f"{'+'.join(job_tasks(job))}_{job[0].method}_job_{digest}"


def job_tasks(job: Sequence[Cell]) -> list[str]:
    """The tasks of ``job`` 's cells, each once, in order."""
    return list(dict.fromkeys(c.task for c in job))


def run_job(
    bench: Workbench,
    cfg: ExperimentConfig,
    job: Sequence[Cell],
    run_dir: str,
    mesh=None,
    rules=None,
) -> list[dict]:
    """Trains (unless zero-shot) and tests the cells of ``job``; returns one record per cell.

    With a ``mesh`` (see :mod:`experiments.launch`) training and testing run on it.
    """
    start = time.time()
    if job[0].method == "zero_shot":
        return [zero_shot_record(bench, cell, start) for cell in job]
    spec = build_job(bench, cfg, job)
    tcfgs = [train_config(cfg, c) for c in job]
    state = train.init_states(
        spec.trainables, tcfgs[0], [t.learning_rate for t in tcfgs], [t.seed for t in tcfgs]
    )
    ckpt_dir = os.path.join(run_dir, "ckpt", job_name(job))
    metrics = [
        os.path.join(run_dir, "metrics", outputs.cell_dir_name(c.key) + ".jsonl") for c in job
    ]
    os.makedirs(os.path.dirname(metrics[0]), exist_ok=True)
    for cell, data in zip(job, spec.datas, strict=True):  # before the batches are drawn
        programs.check_batch_fits(len(data.train["labels"]), cfg.batch_size, cell.key)
    packed = None
    if mesh is None:
        lengths = [task_pack_length(bench, cfg, t, spec.model_fn) for t in job_tasks(job)]
        packed = None if None in lengths else max(lengths)
    tasks = "+".join(job_tasks(job))
    results = train.fit_job(
        spec.model_fn,
        state,
        spec.frozen,
        [d.train for d in spec.datas],
        [d.dev for d in spec.datas],
        tcfgs[0],
        member_inputs=spec.member_inputs,
        test_data=[d.test for d in spec.datas],  # each task's set, evaluated once
        names=[c.key for c in job],
        checkpoint_dir=ckpt_dir,
        callbacks=[train.write_metrics(metrics)],
        progress=job[0].key if len(job) == 1 else f"{tasks} {job[0].method} x{len(job)}",
        mesh=mesh,
        rules=rules,
        pack_length=packed,
    )
    records = []
    for i, (cell, result) in enumerate(zip(job, results, strict=True)):
        best = result.best_trainable
        if spec.plan is not None:
            best = distributed.to_host(lora.unpad(spec.plan, best, i))  # collective
        record = cell_record(
            bench, cfg, cell, spec, i, best, result, tcfgs[i], run_dir, mesh=mesh, rules=rules
        )
        record["seconds"] = (time.time() - start) / len(job)  # the job's time, shared out
        records.append(record)
    distributed.barrier(f"done {job_name(job)}")
    if distributed.is_primary():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return records


def zero_shot_record(bench: Workbench, cell: Cell, start: float) -> dict:
    """The record of a zero-shot cell: the untrained prompt model on dev and test."""
    output_fn, params = bench.prompt_model(cell.task)
    data = bench.data(cell.task, cell.seed, mode="prompt")
    predict = bench.predict(cell.task)
    record = {"task": cell.task, "method": cell.method, "rank": cell.rank, "seed": cell.seed}
    record["dev_accuracy"] = programs.evaluate(predict, params, {}, data.dev)["accuracy"]
    # The test set and the untrained model are the same for every seed: evaluate once.
    record["test_accuracy"] = bench.memo(
        ("zero_shot_test", cell.task),
        lambda: programs.evaluate(predict, params, {}, data.test)["accuracy"],
    )
    record.update(best_step=0, trainable_params=0, seconds=time.time() - start)
    return record


def cell_record(
    bench: Workbench,
    cfg: ExperimentConfig,
    cell: Cell,
    spec: Job,
    i: int,
    best: PyTree,
    result: train.FitResult,
    tcfg: train.TrainConfig,
    run_dir: str,
    *,
    mesh=None,
    rules=None,
) -> dict:
    """The results record of member ``i`` of a trained job (``best``: its best parameters);
    with ``--ntk`` its NTK analysis (on the run's ``mesh``, if any) and with
    ``--save-adapters`` its adapter are written too."""
    record = {"task": cell.task, "method": cell.method, "rank": cell.rank, "seed": cell.seed}
    lcfg = spec.lora_configs[i]
    if cfg.ntk and lcfg is not None:
        record.update(
            ntk_analysis.analyze(
                cell=cell,
                output_fn=spec.output_fns[i],
                params=spec.params,
                lora_config=lcfg,
                adapters0=spec.initial[i],
                adapters=best,
                data=spec.datas[i],
                tcfg=tcfg,
                model_fn_cache=bench.memo,
                run_dir=run_dir,
                kernel_choice=cfg.ntk_kernel,
                mesh=mesh,
                rules=rules,
            )
        )
    record.update(
        dev_accuracy=result.best_dev_accuracy,
        test_accuracy=result.test["accuracy"],
        best_step=result.best_step,
        trainable_params=int(sum(np.size(x) for x in jax.tree.leaves(spec.initial[i]))),
    )
    if cfg.save_adapters and lcfg is not None and distributed.is_primary():
        info = {
            **outputs.task_info(bench.task(cell.task), bench.word_style),
            **record,
            "model": cfg.model,
            "base_model": str(bench.path),  # what from_pretrained / PEFT load it onto
            "head": bench.prompt_head,
            "readout": bench.readout.value,
            "label_word_ids": [int(w) for w in bench.label_word_ids(cell.task)],
            "max_length": cfg.max_length,
        }
        outputs.save_adapter(run_dir, cell.key, best, lcfg, info, base_model=str(bench.path))
    return record
