"""Run a few-shot LoRA experiment end to end: ``python -m experiments.run [--config NAME] ...``.

With no arguments: the offline CPU default (embedded MiniLM-L6, MR and TREC, LoRA rank 1 vs 12
against zero-shot and head-only baselines, 3 seeds). Every cell (task x method x rank x seed)
appends one line to ``runs/<name>/results.jsonl``; ``report.md`` and ``plots/`` are rewritten
from all lines at the end. Re-running skips finished cells, and a cell stopped mid-training
resumes from its last orbax checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import ntk_analysis, report, vectorized
from experiments.cli import add_dataclass_arguments
from experiments.config import NAMED_CONFIGS, ExperimentConfig, get_config
from experiments.workbench import Workbench
from lora_jax import lora, tasks, train
from lora_jax.errors import ConfigError, UserError, user_message
from lora_jax.trainable import Method, make_model_fn, split_params


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


def cells(cfg: ExperimentConfig) -> list[Cell]:
    """All cells, grouped so that cells sharing a compiled program run back to back."""
    return [
        Cell(task, method, rank, seed)
        for task in cfg.tasks
        for method in cfg.methods
        for rank in (cfg.ranks if method == "lora" else (None,))
        for seed in cfg.seeds
    ]


def prepare_run_dir(cfg: ExperimentConfig) -> str:
    """Creates ``out/name`` with ``config.json``; refuses a directory of another configuration."""
    run_dir = os.path.join(cfg.out, cfg.name)
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        # A field missing from an older config.json ran with that field's default.
        saved = {**ExperimentConfig().to_json(), **saved}
        diff = sorted(
            k for k in set(saved) | set(cfg.to_json()) if saved.get(k) != cfg.to_json().get(k)
        )
        if diff:
            raise ConfigError(
                f"{run_dir} holds results of a different configuration (fields differ: "
                f"{', '.join(diff)}). Use another --name (or --out), or delete that directory."
            )
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg.to_json(), f, indent=2)
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory {run_dir!r} ({err.strerror or err}). Fix: pass an "
            "--out (and --name) in a writable place."
        ) from err
    return run_dir


def train_config(cfg: ExperimentConfig, cell: Cell) -> train.TrainConfig:
    lr = cfg.head_lr if cell.method == "head" else cfg.lr
    return train.TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=lr,
        loss=cfg.loss,
        eval_every=cfg.eval_every,
        dropout=cfg.dropout,
        seed=cell.seed,
    )


def lora_config(cfg: ExperimentConfig, rank: int) -> lora.LoraConfig:
    alpha = cfg.alpha if cfg.alpha is not None else 2.0 * rank
    return lora.LoraConfig(r=rank, alpha=alpha, targets=cfg.targets, dropout=cfg.lora_dropout)


def run_cell(bench: Workbench, cfg: ExperimentConfig, cell: Cell, run_dir: str) -> dict:
    """Trains (unless zero-shot) and tests one cell; returns its results record."""
    start = time.time()
    if cell.method == "head":
        output_fn, params, data = bench.cls_head_model(cell.task, cell.seed)
    else:
        output_fn, params = bench.prompt_model(cell.task)
        data = bench.data(cell.task, cell.seed, mode="prompt")
    record = {"task": cell.task, "method": cell.method, "rank": cell.rank, "seed": cell.seed}

    if cell.method == "zero_shot":
        predict = bench.predict(output_fn)
        record["dev_accuracy"] = train.evaluate(predict, params, {}, data.dev)["accuracy"]
        # The test set and the untrained model are the same for every seed: evaluate once.
        record["test_accuracy"] = bench.memo(
            ("zero_shot_test", cell.task),
            lambda: train.evaluate(predict, params, {}, data.test)["accuracy"],
        )
        record.update(best_step=0, trainable_params=0, seconds=time.time() - start)
        return record

    method = {"head": Method.HEAD, "lora": Method.LORA, "full": Method.FULL}[cell.method]
    lcfg = lora_config(cfg, cell.rank) if cell.rank else None
    tcfg = train_config(cfg, cell)
    model_fn = bench.memo(
        ("model_fn", cell.task, cell.method, cell.rank),
        lambda: make_model_fn(output_fn, method, lora_config=lcfg),
    )
    trainable, frozen = split_params(
        params, method, key=jax.random.key(cell.seed), lora_config=lcfg
    )
    state = train.init_state(trainable, train.make_optimizer(tcfg), tcfg.seed)
    ckpt_dir = os.path.join(run_dir, "ckpt", cell.key.replace("/", "_"))
    metrics = os.path.join(run_dir, "metrics", cell.key.replace("/", "_") + ".jsonl")
    os.makedirs(os.path.dirname(metrics), exist_ok=True)
    result = train.fit(
        model_fn,
        state,
        frozen,
        data.train,
        data.dev,
        tcfg,
        checkpoint_dir=ckpt_dir,
        metrics_path=metrics,
        progress=cell.key,
    )
    test = train.evaluate(
        train.programs(model_fn, tcfg).predict, result.best_trainable, frozen, data.test
    )
    if cfg.ntk and method == Method.LORA:
        record.update(
            ntk_analysis.analyze(
                cell=cell,
                output_fn=output_fn,
                params=params,
                lora_config=lcfg,
                adapters0=trainable,
                adapters=result.best_trainable,
                data=data,
                tcfg=tcfg,
                model_fn_cache=bench.memo,
                run_dir=run_dir,
            )
        )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    record.update(
        dev_accuracy=result.best_dev_accuracy,
        test_accuracy=test["accuracy"],
        best_step=result.best_step,
        trainable_params=int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
        seconds=time.time() - start,
    )
    return record


def run(cfg: ExperimentConfig, *, progress: bool = True) -> str:
    """Runs every unfinished cell of ``cfg``, then writes the report; returns the run dir."""
    for name in cfg.tasks:  # fail fast on an unknown task, before any directory is made
        tasks.get_task(name)
    run_dir = prepare_run_dir(cfg)
    results_path = os.path.join(run_dir, "results.jsonl")
    report.drop_torn_tail(results_path)
    done = {
        Cell(r["task"], r["method"], r["rank"], r["seed"]).key
        for r in report.read_results(results_path)
    }
    todo = [c for c in cells(cfg) if c.key not in done]
    print(f"{run_dir}: {len(done)} cells done, {len(todo)} to run", file=sys.stderr)
    if todo:
        bench = Workbench(cfg)
        bar = tqdm(total=len(todo), desc=cfg.name, unit="cell", disable=not progress)
        for job in vectorized.plan_jobs(todo, cfg.members if cfg.vectorize else 0):
            if cfg.vectorize and job[0].method == "lora":
                kw = dict(train_config=train_config, lora_config=lora_config)
                records = vectorized.run_lora_job(bench, cfg, job, run_dir, **kw)
            else:
                records = [run_cell(bench, cfg, cell, run_dir) for cell in job]
            with open(results_path, "a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(records))
        bar.close()
    records = report.read_results(results_path)
    plots = report.plot_accuracy_vs_rank(run_dir, records)
    path = report.write_report(run_dir, cfg.to_json(), records, plots)
    print(report.markdown_table(records))
    if gains := report.gains_table(records):
        print(gains)
    print(f"report: {path}", file=sys.stderr)
    return run_dir


def parse_args(argv: list[str] | None = None) -> ExperimentConfig:
    """Maps the command line one-to-one onto :class:`ExperimentConfig` fields."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="default", help=f"one of {sorted(NAMED_CONFIGS)}")
    add_dataclass_arguments(parser, ExperimentConfig)
    args = vars(parser.parse_args(argv))
    name = args.pop("config")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        return get_config(name, **overrides)
    except UserError as err:
        parser.error(user_message(err))


def main(argv: list[str] | None = None) -> None:
    """The command line: user errors (``lora_jax.errors.UserError``) exit with one line; any
    other exception is a bug and keeps its traceback."""
    cfg = parse_args(argv)
    try:
        run(cfg)
    except UserError as err:
        raise SystemExit(f"error: {user_message(err)}") from err


if __name__ == "__main__":
    main()
