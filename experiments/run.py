"""Run a few-shot LoRA experiment end to end: ``python -m experiments.run [--config NAME] ...``.

With no arguments: the offline CPU default (embedded MiniLM-L6, MR and TREC, LoRA rank 1 vs 12
against zero-shot and head-only baselines, 3 seeds). Every cell (task x method x rank x seed)
appends one line to ``runs/<name>/results.jsonl``; ``report.md`` and ``plots/`` are rewritten
from all lines at the end. Re-running skips finished cells, and a cell stopped mid-training
resumes from its last orbax checkpoint. ``--task-file my.json`` adds a task of your own data
(``lora_jax.tasks.task_file``); ``--save-adapters`` and ``--tensorboard`` keep each cell's
adapter and curves (``experiments.outputs``). A config of several encoders (``--models``, e.g.
``--config paper_binary``) runs each as its own run in ``runs/<name>/<encoder>/`` and combines
them in ``runs/<name>/report.md``. Reports test rank 1 against rank 12 per task (paired over
seeds) and give the best rank with its interval (``experiments.stats``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm.auto import tqdm

from experiments import jobs, launch, ntk_analysis, outputs, report
from experiments.cli import add_dataclass_arguments
from experiments.config import (
    CONFIG_HELP,
    NAMED_CONFIGS,
    ExperimentConfig,
    get_config,
    per_encoder,
)
from experiments.jobs import Cell, cells
from experiments.workbench import Workbench, check_model
from lora_jax import distributed, tasks
from lora_jax.errors import ConfigError, UserError, user_message

# Fields renamed since a run directory may have been written: old name -> new name.
_RENAMED = {"dropout": "train_dropout"}


def prepare_run_dir(cfg: ExperimentConfig) -> str:
    """Creates ``out/name`` with ``config.json``; refuses a directory of another configuration.

    ``config.json`` also records the sha256 of each task file and its data.
    """
    run_dir = os.path.join(cfg.out, cfg.name)
    if not distributed.is_primary():  # process 0 checks and writes config.json
        return run_dir
    path = os.path.join(run_dir, "config.json")
    current = {**cfg.to_json(), **run_digests(cfg)}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        saved = {_RENAMED.get(k, k): v for k, v in saved.items()}
        # A field missing from an older config.json ran with that field's default.
        defaults = ExperimentConfig().to_json()
        saved = {**{k: defaults[k] for k in current if k in defaults}, **saved}
        saved_view, current_view = _by_content(saved), _by_content(current)
        diff = sorted(
            k
            for k in set(saved_view) | set(current_view)
            if saved_view.get(k) != current_view.get(k)
        )
        if diff:
            raise ConfigError(
                f"{run_dir} holds results of a different configuration (fields differ: "
                f"{', '.join(diff)}). Use another --name (or --out), or delete that directory."
            )
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(current, f, indent=2)
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory {run_dir!r} ({err.strerror or err}). Fix: pass an "
            "--out (and --name) in a writable place."
        ) from err
    return run_dir


def _by_content(config: dict) -> dict:
    """``config`` with its task files named by their digests, in order: the same files at
    another path (a moved checkout, a worktree) are the same run; changed data is not. A
    config.json without digests keeps its paths."""
    digests = config.get("task_file_sha256")
    if not digests or set(digests) != set(config.get("task_files", ())):
        return config
    named = [digests[p] for p in config["task_files"]]
    return {**config, "task_files": named, "task_file_sha256": named}


def run_digests(cfg: ExperimentConfig) -> dict:
    """``{"task_file_sha256": {path: digest}}`` for the task files of ``cfg`` ({} if none)."""
    if not cfg.task_files:
        return {}
    return {"task_file_sha256": {p: tasks.task_file_digest(p) for p in cfg.task_files}}


def run(cfg: ExperimentConfig, *, progress: bool = True, mesh=None, rules=None) -> str:
    """Runs every unfinished cell of ``cfg``, then writes the report; returns the run dir.

    With a ``mesh`` every cell trains on it, and with ``--ntk`` its linearized model and
    kernels are computed on it too. On several processes all of them run this with the same
    arguments and ``cfg.out`` on a file system they share; only process 0 writes
    ``config.json``, results, the report and plots. A config of several ``models`` runs
    `run_encoders`.
    """
    if cfg.models:
        return run_encoders(cfg, progress=progress, mesh=mesh, rules=rules)
    # Fail fast on a bad --model or --max-length, an unknown task or a bad task file, before
    # any directory is made.
    check_model(cfg)
    named = tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=cfg.k)
    if cfg.ntk:
        ntk_analysis.kernel_mesh(mesh)  # a mesh the kernels cannot use fails now
    if cfg.tensorboard:
        outputs.summary_writer_class()  # a missing tensorboardX fails now, not after a cell
    run_dir = prepare_run_dir(cfg)
    distributed.barrier("run dir")
    results_path = os.path.join(run_dir, "results.jsonl")
    report.drop_torn_tail(results_path)
    done = {
        Cell(r["task"], r["method"], r["rank"], r["seed"]).key
        for r in report.read_results(results_path)
    }
    todo = [c for c in cells(cfg, tuple(named)) if c.key not in done]
    print(f"{run_dir}: {len(done)} cells done, {len(todo)} to run", file=sys.stderr)
    if todo:
        bench = Workbench(cfg, named)
        primary = distributed.is_primary()
        members = jobs.members_per_job(cfg)  # 0: one cell at a time
        bar = tqdm(total=len(todo), desc=cfg.name, unit="cell", disable=not (progress and primary))
        # With vectorized jobs, the LoRA cells of tasks of one shape share jobs.
        for job in jobs.plan_jobs(todo, members, shape_of=bench.job_shape if members else None):
            records = jobs.run_job(bench, cfg, job, run_dir, mesh, rules)
            bar.update(len(records))
            if not primary:
                continue
            with open(results_path, "a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if cfg.tensorboard:
                for cell, record in zip(job, records, strict=True):
                    outputs.write_tensorboard(run_dir, cell.key, record)
        bar.close()
    if not distributed.is_primary():
        return run_dir
    records = report.read_results(results_path)
    plots = report.plot_accuracy_vs_rank(run_dir, records)
    path = report.write_report(run_dir, cfg.to_json(), records, plots)
    print(report.markdown_table(records))
    if gains := report.gains_table(records):
        print(gains)
    if tests := report.rank_test_table(records):
        print(tests)
    print(f"report: {path}", file=sys.stderr)
    return run_dir


def run_encoders(cfg: ExperimentConfig, *, progress: bool = True, mesh=None, rules=None) -> str:
    """Runs ``cfg`` once per encoder of ``cfg.models``, then writes the combined report.

    Each encoder's run is an ordinary run (`run`) in ``out/name/<encoder_dir>/``, with its own
    ``config.json`` (``model`` = that encoder), results, report and resume; ``out/name/`` holds
    the whole config's ``config.json`` (so a different encoder list is refused there too), and
    ``report.md`` / ``plots/`` of all encoders' records, each tagged with its ``model``.
    """
    tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=cfg.k)  # fail before making directories
    for one in per_encoder(cfg):
        check_model(one)
    run_dir = prepare_run_dir(cfg)
    distributed.barrier("run dir")
    records = []
    for one in per_encoder(cfg):
        print(f"encoder {one.model}: {one.out}/{one.name}", file=sys.stderr)
        own = run(one, progress=progress, mesh=mesh, rules=rules)
        if distributed.is_primary():
            results = report.read_results(os.path.join(own, "results.jsonl"))
            records += [{**r, "model": one.name} for r in results]
    if not distributed.is_primary():
        return run_dir
    plots = report.plot_accuracy_vs_rank(run_dir, records)
    path = report.write_report(run_dir, cfg.to_json(), records, plots)
    if tests := report.rank_test_table(records):
        print(tests)
    print(f"report: {path}", file=sys.stderr)
    return run_dir


def build_parser(prog: str = "python -m experiments.run", description: str | None = __doc__):
    """The parser of the run flags: ``--config``, one flag per :class:`ExperimentConfig`
    field, and the :mod:`experiments.launch` flags (``experiments.plan`` adds its own)."""
    width = max(map(len, NAMED_CONFIGS))
    epilog = "named configs (--config NAME):\n" + "\n".join(
        f"  {name:<{width}}  {CONFIG_HELP[name]}" for name in NAMED_CONFIGS
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default="default",
        metavar="NAME",
        help="a named config (listed below); the flags below override its fields",
    )
    add_dataclass_arguments(parser, ExperimentConfig)
    launch.add_arguments(parser)
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: dict) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of parsed ``args`` (the launch flags already popped)."""
    name = args.pop("config")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    if overrides["task_files"] and overrides["tasks"] is None:
        overrides["tasks"] = ()  # only the task files, unless --tasks is given too
    try:
        return get_config(name, **overrides)
    except UserError as err:
        parser.error(user_message(err))


def parse_args(argv: list[str] | None = None) -> ExperimentConfig:
    """Maps the command line one-to-one onto :class:`ExperimentConfig` fields."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    launch.pop_launch(args)  # read by parse_launch
    return config_from_args(parser, args)


def parse_launch(argv: list[str] | None = None) -> launch.Launch:
    """The mesh and process flags of the command line (see :mod:`experiments.launch`)."""
    parser = argparse.ArgumentParser(add_help=False)
    launch.add_arguments(parser)
    return launch.pop_launch(vars(parser.parse_known_args(argv)[0]))


def main(argv: list[str] | None = None) -> None:
    """The command line: user errors (``lora_jax.errors.UserError``) exit with one line, and
    so does a multi-process run that loses a process (exit code 75: re-run to resume); any
    other exception is a bug and keeps its traceback."""
    cfg = parse_args(argv)
    try:
        mesh, rules = launch.start(parse_launch(argv))
        run(cfg, mesh=mesh, rules=rules)
    except UserError as err:
        raise SystemExit(f"error: {user_message(err)}") from err
    except Exception as err:
        if reason := distributed.lost_peer(err):
            distributed.stop_lost(reason)
        raise


if __name__ == "__main__":
    main()
