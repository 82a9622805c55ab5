"""Plan a run for a TPU slice or GPU nodes without them: ``python -m experiments.plan --topology
v4-32 ...``.

Takes the flags of ``experiments.run`` (the same config, ``--mesh`` and ``--rules``) plus
``--topology`` (a TPU slice by its Cloud name, or NVIDIA nodes such as ``h100-8``:
:data:`lora_jax.topologies.TARGETS`), and compiles, for the target's compile-only devices
(:mod:`lora_jax.topologies`; the ``tpu`` extra for TPU slices, ``cuda-plan`` for GPUs), the
programs the run would execute: each job's training chunk
(``lora_jax.programs.job_programs``, placed as ``lora_jax.train.fit_job`` places it) and its
dev and test evaluation, and with ``--ntk`` each LoRA cell's analysis: its linearized model's
training (:func:`plan_linearized`) and its eNTK programs as ``ntk.empirical_ntk_fn`` would run
them on the mesh (:func:`plan_kernels`); with ``--all-weights-kernel`` also the eNTK over every
weight of the run's tasks, embedding tables compacted (``--distinct-tokens`` sizes the word
table), its weights split over the mesh's ``fsdp`` axis when it has one. Shapes only: the
encoder's ``config.json`` (shipped in ``experiments/hub_configs/`` for the paper's hub
encoders, so no download and no weights), the tasks' class counts, ``k`` and ``max_length``
(every split padded to it: an upper bound of the run's own padding). Per device it prints peak
memory against the chip's HBM, matmul FLOPs per step, the collectives of a step, compile time
and a roofline estimate of step and run time.

Example:
  uv sync --extra tpu --extra cuda-plan
  python -m experiments.plan --topology v4-32 --config paper_binary \\
      --model FacebookAI/roberta-large --tasks sst2 --ranks 8 --seeds 13 --dtype bfloat16
  python -m experiments.plan --topology h100-8 --config paper_binary \\
      --model FacebookAI/roberta-large --tasks sst2 --dtype bfloat16 --members 32
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ntk
from experiments import jobs, launch, ntk_analysis
from experiments.config import ExperimentConfig, per_encoder
from experiments.run import build_parser, config_from_args
from experiments.workbench import resolve_model
from lora_jax import lora, members, programs, tasks, topologies, train
from lora_jax import sharding as sh
from lora_jax.errors import ConfigError, UserError, user_message
from lora_jax.models.config import EncoderConfig
from lora_jax.models.encoder import forward, param_shapes
from lora_jax.params import flatten, unflatten
from lora_jax.readout import Readout, make_output_fn
from lora_jax.trainable import Method, label_words_as_inputs, make_model_fn, split_params
from ntk import planning as ntk_planning
from ntk.linearize import lora_linearized_model_fn

PyTree = Any
HUB_CONFIGS = os.path.join(os.path.dirname(__file__), "hub_configs")
# The hub encoders whose config.json ships here, and the head their checkpoint has (what
# ``readout='auto'`` picks: the MLM head, ELECTRA's discriminator head, or none).
SHIPPED = {
    "roberta-large": "mlm",
    "roberta-base": "mlm",
    "bert-base-uncased": "mlm",
    "electra-base-discriminator": "rtd",
    "deberta-v3-base": None,
}
_READOUT_HEAD = {Readout.MLM: "mlm", Readout.RTD: "rtd", Readout.TIED: None}
_READOUT_HEAD[Readout.TIED_MEAN] = None


def encoder_shapes(cfg: ExperimentConfig) -> tuple[EncoderConfig, str | None, Readout]:
    """The encoder config, the head its prompt model loads, and its readout, without weights:
    a shipped hub config (by the last part of the id), or a local directory's config.json."""
    name = cfg.model.rsplit("/", 1)[-1]
    if name in SHIPPED:
        with open(os.path.join(HUB_CONFIGS, f"{name}.json")) as f:
            hf, head = json.load(f), SHIPPED[name]
    else:
        path = os.path.join(resolve_model(cfg.model), "config.json")
        if not os.path.exists(path):
            raise ConfigError(
                f"--model {cfg.model}: planning needs its config.json, and none ships here "
                f"(shipped: {', '.join(SHIPPED)}) nor is at {path}; pass a local model directory."
            )
        with open(path) as f:
            hf = json.load(f)
        head = {"bert": "mlm", "roberta": "mlm", "electra": "rtd"}.get(hf.get("model_type"))
        if cfg.model == "minilm":
            head = None  # a bare BertModel: no MLM head
    config = EncoderConfig.from_hf(hf)
    if cfg.readout != "auto":
        readout = Readout(cfg.readout)
        head = _READOUT_HEAD.get(readout, head)
    else:
        readout = {"mlm": Readout.MLM, "rtd": Readout.RTD, None: Readout.TIED_MEAN}[head]
    return config, head, readout


def abstract_data(rows: int, length: int) -> dict:
    """``jax.ShapeDtypeStruct`` s of an encoded prompt split (``lora_jax.tasks.encode``)."""
    token = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    one = jax.ShapeDtypeStruct((rows,), jnp.int32)
    return {
        "input_ids": token,
        "attention_mask": token,
        "token_type_ids": token,
        "mask_pos": one,
        "labels": one,
    }


class Program(NamedTuple):
    """One compiled program of a plan and what it reports (per device)."""

    name: str  # e.g. "train r=8 x1 (25 steps)"
    report: topologies.ProgramReport | None
    error: str | None  # why it did not compile (e.g. out of HBM)
    runs: float  # executions per job
    steps: int  # training steps per execution (0 for evaluation)


def _sds(tree: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


# Where _compile writes each program's optimized HLO (--dump-hlo), or None.
_DUMP: dict[str, str | None] = {"dir": None}


def _compile(name: str, compile_fn, runs: float, steps: int) -> Program:
    """``compile_fn()`` (lowering and compiling one program) timed, and its report."""
    start = time.perf_counter()
    try:
        compiled = compile_fn()
    except Exception as err:  # noqa: BLE001 -- XLA reports an out-of-memory program this way
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        return Program(name, None, " ".join(text.split())[:300], runs, steps)
    seconds = time.perf_counter() - start
    if _DUMP["dir"]:
        os.makedirs(_DUMP["dir"], exist_ok=True)
        file = "".join(c if c.isalnum() or c in "-=." else "_" for c in name) + ".hlo.txt"
        with open(os.path.join(_DUMP["dir"], file), "w") as f:
            f.write(compiled.as_text())
    return Program(name, topologies.analyze(compiled, seconds), None, runs, steps)


def _model(
    cfg: ExperimentConfig, encoder, num_labels: int, *, words_at_call: bool = False
) -> tuple[PyTree, Any]:
    """The encoder's parameters (float32 shapes) and its prompt model ``output_fn(params,
    batch) -> [N, num_labels]``, as the run builds them: the label words given per call
    (``words_at_call``, the training and evaluation programs) or fixed (the NTK analysis)."""
    config, head, readout = encoder
    shapes = param_shapes(config, head=head, num_labels=None, pooler=False)
    params = unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})
    apply_fn = functools.partial(forward, config=config, head=head, dtype=cfg.dtype)
    if cfg.remat:
        apply_fn = functools.partial(apply_fn, remat=True)
    if words_at_call:
        return params, make_output_fn(apply_fn, readout, label_words_at_call=True)
    return params, make_output_fn(apply_fn, readout, np.arange(num_labels))


def plan_job(
    cfg: ExperimentConfig,
    job: Sequence[jobs.Cell],
    encoder: tuple[EncoderConfig, str | None, Readout],
    num_labels: int,
    mesh,
    rules,
    *,
    training: bool = True,
    evaluation: bool = True,
) -> list[Program]:
    """Compiles the programs of ``job`` as :func:`experiments.jobs.run_job` would run them:
    its training chunks (with ``training``) and its dev and test evaluation (with
    ``evaluation``)."""
    config = encoder[0]
    # As experiments.jobs.build_job: the label words an argument, one [K] row per member.
    params, output_fn = _model(cfg, encoder, num_labels, words_at_call=True)
    method, n = Method(job[0].method), len(job)
    words = jax.ShapeDtypeStruct((n, num_labels), jnp.int32)
    member_inputs = (words, None)
    if method == Method.LORA:
        configs = [jobs.lora_config(cfg, c.rank, config.model_type) for c in job]
        stack = lora.plan_stack(params, configs)
        fusion = lora.Fusion.FUSED if n > 1 else lora.Fusion.AUTO
        model_fn = make_model_fn(output_fn, Method.LORA, lora_config=stack.config, fusion=fusion)
        if stack.factors is not None:
            model_fn = lora.with_member_factors(model_fn)
            member_inputs = (words, jax.eval_shape(lambda: stack.factors))
        model_fn = label_words_as_inputs(model_fn)
        seeds = [c.seed for c in job]
        trainables = jax.eval_shape(lambda p: lora.init_stack(p, stack, seeds), params)
        frozen = params
    elif method == Method.FULL:
        model_fn = label_words_as_inputs(make_model_fn(output_fn, Method.FULL))
        trainable, frozen = split_params(params, method)
        trainables = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), trainable)
    else:
        raise ConfigError(f"planning covers lora and full jobs, not {method.value!r}.")
    label = f"{method.value}" + (f" r={job[0].rank}" if n == 1 and job[0].rank else "")
    tcfg = jobs.train_config(cfg, job[0])
    return _plan_fit(
        cfg, tcfg, label, model_fn, trainables, frozen, member_inputs, num_labels, mesh, rules,
        training=training, evaluation=evaluation,
    )  # fmt: skip


def plan_linearized(
    cfg: ExperimentConfig, cell: jobs.Cell, encoder, num_labels: int, mesh, rules
) -> list[Program]:
    """Compiles the training of ``cell`` 's linearized LoRA model (its ``--ntk`` analysis,
    :mod:`experiments.ntk_analysis`) as ``lora_jax.train.fit`` runs it on ``mesh``: the
    training chunks of :func:`ntk.lora_linearized_model_fn` (a forward pass plus a JVP per step,
    through the LoRA factors when it runs data parallel: ``ntk_analysis.linearized_fusion``) and
    its dev evaluation, with the cell's hyperparameters."""
    params, output_fn = _model(cfg, encoder, num_labels)  # the analysis's fixed label words
    lcfg = jobs.lora_config(cfg, cell.rank, encoder[0].model_type)
    tcfg = jobs.train_config(cfg, cell)
    fusion = ntk_analysis.linearized_fusion(mesh, rules, tcfg.batch_size)
    model_fn = lora_linearized_model_fn(output_fn, lcfg, fusion=fusion)
    adapters = jax.eval_shape(
        lambda p: members.stack([lora.init(jax.random.key(0), p, lcfg)]), params
    )
    return _plan_fit(
        cfg, tcfg, f"linearized r={cell.rank}", model_fn, adapters, params, None, num_labels,
        mesh, rules, test=False,
    )  # fmt: skip


def _plan_fit(
    cfg: ExperimentConfig,
    tcfg: train.TrainConfig,
    label: str,
    model_fn,
    trainables: PyTree,
    frozen: PyTree,
    member_inputs: PyTree | None,
    num_labels: int,
    mesh,
    rules,
    *,
    training: bool = True,
    evaluation: bool = True,
    test: bool = True,
) -> list[Program]:
    """The programs of ``lora_jax.train.fit_job`` on ``trainables`` (leaves ``[n, ...]``): its
    training chunks (with ``training``) and its dev (and with ``test`` test) evaluation (with
    ``evaluation``), placed as it places them on ``mesh``."""
    n = int(jax.tree.leaves(trainables)[0].shape[0])
    # As fit_job runs it: on the mesh the members fill whole slots, padded with idle copies.
    slots = programs.member_slots(mesh, rules, n, tcfg.batch_size)
    state = jax.eval_shape(
        lambda t: members.pad(train.init_states(t, tcfg, [tcfg.learning_rate] * n, [0] * n), slots),
        trainables,
    )
    compiled = programs.job_programs(
        model_fn, tcfg, member_inputs=member_inputs is not None, mesh=mesh, rules=rules
    )
    table = programs.job_rules(mesh, rules, slots)
    if slots == 1:
        programs.check_batch_split(mesh, table, tcfg.batch_size)
    place = functools.partial(train.job_shardings, mesh=mesh, table=table)
    state = _sds(state, place(state))
    args = base = _sds(frozen, place(frozen))
    if member_inputs is not None:
        member_inputs = jax.eval_shape(lambda m: members.pad(m, slots), member_inputs)
        args = (base, _sds(member_inputs, place(member_inputs)))
    rows = cfg.k * num_labels
    # Each member samples its own few-shot sets: its train and dev data beside it.
    own = slots > 1

    def split_data(count: int, shared: bool) -> dict:
        data = abstract_data(count, cfg.max_length)
        if not shared:
            data = {k: jax.ShapeDtypeStruct((slots, *x.shape), x.dtype) for k, x in data.items()}
        return _sds(data, place(data, data=True, shared=shared))

    train_data = split_data(rows, not own)
    lengths = train.chunk_lengths(cfg.steps, cfg.eval_every)
    label += f" x{n}" + (f" in {slots} slots" if slots != n else "")
    out = []
    for length in sorted(set(lengths), reverse=True) if training else ():
        out.append(
            _compile(
                f"train {label} ({length} steps)",
                lambda length=length: compiled.chunk.lower(
                    state, args, train_data, length, shared=not own
                ).compile(),
                lengths.count(length),
                length,
            )
        )
    test_rows = cfg.test_cap or 1000
    splits = (("dev", rows, len(lengths), not own), ("test", test_rows, 1, True))[: 1 + test]
    for split, count, runs, shared in splits if evaluation else ():
        data = split_data(count, shared)
        out.append(
            _compile(
                f"{split} {label} ({count} rows)",
                lambda data=data, shared=shared: compiled.predict_program.lower(
                    state.trainable, args, data, shared
                ).compile(),
                runs,
                0,
            )
        )
    return out


def plan_kernels(
    cfg: ExperimentConfig,
    cell: jobs.Cell,
    encoder,
    num_labels: int,
    mesh,
    *,
    all_weights: bool = False,
    distinct_tokens: int | None = None,
) -> list[Program]:
    """Compiles the eNTK programs of ``cell`` 's ``--ntk`` analysis
    (:mod:`experiments.ntk_analysis`) as :func:`ntk.empirical_ntk_fn` runs them on ``mesh``
    (:func:`ntk.planning.kernel_programs`: rows over ``data``; the adapters and the frozen base
    replicated, or split over ``fsdp`` when the mesh has it): for each kernel it reports,
    ``K([train; test], train)`` (train and test padded alike, as planned), and for the first
    also ``K(train, train)`` at the trained adapters (the kernel's change). Runs are per cell.

    With ``all_weights`` the same kernels over every weight instead
    (``ntk.kernel_model(output_fn, params, 'all')``, Jacobians kept: not part of the run's
    ``--ntk``), the embedding tables compacted to the rows that ``distinct_tokens`` distinct
    ids need (:func:`ntk.planning.compacted_tables`; None: the bound ``rows x max_length``
    plus the label words, which compacts nothing once it passes the vocabulary).
    """
    train_rows, test_rows = cfg.k * num_labels, cfg.test_cap or 1000
    x_train = abstract_data(train_rows, cfg.max_length)
    x_both = abstract_data(train_rows + test_rows, cfg.max_length)
    compacted = None
    if all_weights:
        g, base, diff, compacted = _all_weights_model(cfg, encoder, num_labels, distinct_tokens)
    else:
        params, output_fn = _model(cfg, encoder, num_labels)
        lcfg = jobs.lora_config(cfg, cell.rank, encoder[0].model_type)
        base, diff = params, jax.eval_shape(lambda p: lora.init(jax.random.key(0), p, lcfg), params)

        def g(base, a, x):  # ntk.lora_kernel_model's f, with the base as an argument
            return output_fn(lora.apply(base, a, lcfg), x)

    optimizer = jobs.train_config(cfg, cell).optimizer
    out = []
    for i, kernel in enumerate(ntk_analysis.kernels_for(cfg.ntk_kernel, optimizer)):
        sides = [(f"[train; test] {train_rows + test_rows}", x_both)]
        sides += [(f"train {train_rows}", x_train)] * (i == 0 and not all_weights)
        implementation = (
            ntk.NtkImplementation.JACOBIAN_CONTRACTION
            if all_weights
            else ntk_analysis.kernel_implementation(kernel)
        )
        for label, x1 in sides:
            for p in ntk_planning.kernel_programs(
                g, base, diff, x1, x_train, trace_axes=ntk_analysis.TRACE_AXES,
                vmap_axes=ntk_analysis.VMAP_AXES, batch_size=ntk_analysis.KERNEL_BATCH_SIZE,
                implementation=implementation, kernel=kernel, compacted=compacted,
                **ntk_analysis.kernel_mesh(mesh),
            ):  # fmt: skip
                what = f"{kernel.value}{' all weights' if all_weights else ''}"
                name = f"ntk {what} K({label} x train {train_rows}): {p.name}"
                out.append(_compile(name, p.compile, p.runs, 0))
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _collectives_text(colls: Sequence[topologies.Collective], limit: int = 3) -> str:
    parts = [f"{c.count}x {c.kind} {c.shape} ({c.bytes / 2**20:.2f} MiB)" for c in colls[:limit]]
    if len(colls) > limit:
        parts.append(f"+{len(colls) - limit} more")
    return "; ".join(parts) or "none"


def format_plan(target: topologies.Target, mesh, progs: Sequence[Program]) -> str:
    """The plan as a markdown table (per device), with the roofline times."""
    chip = target.chip
    lines = [
        f"{target.name}: {target.chips} x {chip.name} ({target.hosts} "
        f"host{'s' if target.hosts > 1 else ''}, "
        f"{_gib(chip.hbm_bytes)} GiB HBM per chip), mesh "
        + ",".join(f"{a}={s}" for a, s in mesh.shape.items()),
        "",
        "| program | compile s | args GiB | temp GiB | peak GiB | fits | GFLOP/step "
        "| collectives per run | roofline ms/step |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for p in progs:
        if p.report is None:
            lines.append(f"| {p.name} | | | | | no: {p.error} | | | |")
            continue
        r = p.report
        per = max(p.steps, 1)
        ms = 1e3 * topologies.roofline(r.costs.flops, r.costs.hbm_bytes, chip) / per
        fits = "yes" if r.peak_bytes <= chip.hbm_bytes else "no"
        lines.append(
            f"| {p.name} | {r.compile_seconds:.1f} | {_gib(r.argument_bytes)} | "
            f"{_gib(r.temp_bytes)} | {_gib(r.peak_bytes)} | {fits} | "
            f"{r.costs.flops / per / 1e9:.1f} | {_collectives_text(r.costs.collectives)} | "
            f"{ms:.2f} |"
        )
    return "\n".join(lines)


def batch_headroom(cfg: ExperimentConfig, target, mesh, rules, progs: Sequence[Program]) -> str:
    """Which batch fits: the largest multiple of the batch shards whose training program would
    fit HBM if its temporaries grow in proportion to the batch (arguments do not)."""
    ways = sh.batch_ways(mesh, rules)
    lines = []
    for p in progs:
        if p.steps == 0 or p.report is None:
            continue
        if " slots " in p.name:  # a member-split job: each chip holds whole members
            slots = int(p.name.split(" slots ")[0].rsplit(" ", 1)[1])
            per_chip = slots // math.prod(mesh.shape.values())
            lines.append(
                f"{p.name}: {per_chip} member{'s' * (per_chip > 1)} per chip, "
                f"{_gib(p.report.peak_bytes)} of {_gib(target.chip.hbm_bytes)} GiB per chip."
            )
            continue
        r = p.report
        fixed = r.peak_bytes - r.temp_bytes
        per_row = r.temp_bytes / cfg.batch_size
        rows = (target.chip.hbm_bytes - fixed) / per_row if per_row else float("inf")
        most = int(rows // ways) * ways
        lines.append(
            f"{p.name}: batch {cfg.batch_size} uses {_gib(r.peak_bytes)} of "
            f"{_gib(target.chip.hbm_bytes)} GiB per chip; batches up to about {most:,} would fit "
            f"(temporaries {_gib(per_row * ways)} GiB per {ways} rows, linear in the batch)."
        )
    return "\n".join(lines)


def job_seconds(progs: Sequence[Program], chip: topologies.Chip) -> float:
    """Roofline seconds of one job: each program times its runs per job."""
    return sum(
        p.runs * topologies.roofline(p.report.costs.flops, p.report.costs.hbm_bytes, chip)
        for p in progs
        if p.report is not None
    )


def _plan_jobs(cfg, cells, members_cap, named, encoder, mesh, rules, target, done=None):
    """``(programs, roofline seconds, job count)`` of ``cells`` grouped into jobs as a run
    groups them (``members_cap`` cells at most, 0: one each); jobs of one shape compile once,
    and not again if ``done`` (a dict kept across calls) holds their programs."""
    done = {} if done is None else done
    groups: dict[tuple, list] = {}
    # As a run groups them: tasks with one K share jobs (their planned rows are all padded to
    # max_length, so K is their whole shape here).
    for job in jobs.plan_jobs(cells, members_cap, shape_of=lambda t: named[t].num_labels):
        k = named[job[0].task].num_labels
        key = (job[0].method, tuple(c.rank for c in job), k)
        groups.setdefault(key, []).append(job)
    progs, total = [], 0.0
    for key, same in groups.items():
        if key not in done:
            done[key] = plan_job(cfg, same[0], encoder, key[2], mesh, rules)
        job_progs = done[key]
        progs += job_progs
        total += len(same) * job_seconds(job_progs, target.chip)
    return progs, total, sum(len(v) for v in groups.values())


def _plan_ntk(cfg, cells, named, encoder, mesh, rules, target) -> str:
    """The ``--ntk`` analysis of the LoRA ``cells``, compiled once per shape (task classes,
    rank, optimizer): the linearized model's training and the kernels; their table and
    roofline estimate for the run."""
    groups: dict[tuple, list] = {}
    for cell in cells:
        if cell.method == "lora":
            k = named[cell.task].num_labels
            optimizer = jobs.train_config(cfg, cell).optimizer
            groups.setdefault((k, cell.rank, optimizer), []).append(cell)
    progs, total = [], 0.0
    for (k, _, _), same in groups.items():
        cell_progs = plan_linearized(cfg, same[0], encoder, k, mesh, rules)
        cell_progs += plan_kernels(cfg, same[0], encoder, k, mesh)
        progs += cell_progs
        total += len(same) * job_seconds(cell_progs, target.chip)
    count = sum(len(v) for v in groups.values())
    return (
        f"NTK analysis (--ntk {cfg.ntk_kernel.value}, per LoRA cell: the linearized model's "
        "training, then the kernels; runs = executions per cell):\n\n"
        + format_plan(target, mesh, progs)
        + f"\n\nroofline estimate of the NTK analysis of the run's {count} LoRA cells: "
        f"{total:.1f} s"
    )


def _distinct_bound(cfg: ExperimentConfig, num_labels: int) -> int:
    """At most this many distinct ids in a kernel's rows: every token of ``[train; test]``
    distinct, plus the label words."""
    rows = cfg.k * num_labels + (cfg.test_cap or 1000)
    return rows * cfg.max_length + num_labels


def _all_weights_model(cfg: ExperimentConfig, encoder, num_labels: int, distinct_tokens):
    """``(g, base, params, compacted)`` of the all-weights kernel, as :func:`plan_kernels`
    plans it: ``g(base, params, x)`` the prompt model of every weight
    (``ntk.kernel_model(output_fn, params, 'all')``, ``base`` empty) and its embedding tables
    compacted for ``distinct_tokens`` ids (None: :func:`_distinct_bound`)."""
    params, output_fn = _model(cfg, encoder, num_labels)
    f, diff, info = ntk.kernel_model(output_fn, params, "all")
    distinct = distinct_tokens or _distinct_bound(cfg, num_labels)
    tables = ntk_planning.compacted_tables(diff, info.embedding_rows, distinct, cfg.max_length)
    return (lambda _, p, x: f(p, x)), {}, diff, tables


def plan_all_weights(
    cfg: ExperimentConfig, cells, named, encoder, mesh, target, distinct_tokens: int | None
) -> tuple[str, list[Program]]:
    """The all-weights eNTK of each task shape (classes, optimizer) of the run's ``cells``, as
    :func:`plan_kernels` ``(all_weights=True)`` compiles it: its report (the tables compacted,
    the programs' table and a roofline estimate) and the programs."""
    groups: dict[tuple, jobs.Cell] = {}
    for cell in cells:
        k = named[cell.task].num_labels
        groups.setdefault((k, jobs.train_config(cfg, cell).optimizer), cell)
    k_max = max(k for k, _ in groups)
    distinct = distinct_tokens or _distinct_bound(cfg, k_max)
    progs, total = [], 0.0
    for (k, _), cell in groups.items():
        kernel_progs = plan_kernels(
            cfg, cell, encoder, k, mesh, all_weights=True, distinct_tokens=distinct
        )
        progs += kernel_progs
        total += job_seconds(kernel_progs, target.chip)
    _, _, diff, tables = _all_weights_model(cfg, encoder, k_max, distinct)
    full = flatten(diff)
    cut = ", ".join(
        f"{path.split('.')[-2]} {rows:,} of {full[path].shape[0]:,} rows"
        for path, rows in tables.items()
    )
    source = "--distinct-tokens" if distinct_tokens else "the bound rows x max_length + labels"
    text = (
        f"All-weights eNTK (--all-weights-kernel; --ntk-kernel {cfg.ntk_kernel.value}, Jacobians "
        f"kept; not part of the run's --ntk), tables compacted for {distinct:,} distinct ids "
        f"({source}): {cut or 'none'}; runs = executions per kernel:\n\n"
        + format_plan(target, mesh, progs)
        + f"\n\nroofline estimate of one kernel per task shape: {total:.1f} s"
    )
    return text, progs


def plan(
    cfg: ExperimentConfig,
    target_name: str,
    launch_flags: launch.Launch,
    *,
    all_weights_kernel: bool = False,
    distinct_tokens: int | None = None,
) -> str:
    """Compiles every distinct program of ``cfg`` 's run for ``target_name``; the report text.
    With ``all_weights_kernel`` also the all-weights eNTK of the run's tasks
    (:func:`plan_kernels`, ``distinct_tokens`` sizing its compacted embedding tables)."""
    target = topologies.target(target_name)
    devices = topologies.devices(target_name)
    mesh = sh.make_mesh(launch_flags.mesh or {"data": len(devices)}, devices=devices)
    rules = sh.rules_for_mesh(mesh) if launch_flags.rules is None else sh.rules(launch_flags.rules)
    sh.check_rules(rules, mesh)
    named = tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=cfg.k)
    out = []
    for one in per_encoder(cfg):
        encoder = encoder_shapes(one)
        cells = jobs.cells(one, tuple(named))
        todo = [c for c in cells if c.method in ("lora", "full")]
        skipped = sorted({c.method for c in cells} - {"lora", "full"})
        done: dict = {}  # programs compiled for this encoder, by job shape
        progs, total, count = _plan_jobs(
            one, todo, jobs.members_per_job(one), named, encoder, mesh, rules, target, done
        )
        text = format_plan(target, mesh, progs)
        text += "\n\n" + batch_headroom(one, target, mesh, rules, progs)
        note = f" (not planned: {', '.join(skipped)})" if skipped else ""
        text += (
            f"\n\nroofline estimate of the run's {count} jobs{note}: {total:.1f} s "
            "(a lower bound: communication and host time left out)"
        )
        if jobs.members_per_job(one) and todo:
            # The same cells one after another, each data parallel over the slice: the cell of
            # the largest rank stands for every cell (an upper bound of their time).
            largest = max(todo, key=lambda c: c.rank or 0)
            single, _, _ = _plan_jobs(one, [largest], 0, named, encoder, mesh, rules, target, done)
            seq = len(todo) * job_seconds(single, target.chip)
            text += (
                f"\n\none cell at a time, data parallel (each timed as {largest.key}): "
                f"{seq:.1f} s for {len(todo)} cells; the member-sharded jobs are "
                f"{seq / total if total else float('nan'):.1f}x faster by the same roofline"
            )
        if one.ntk:
            text += "\n\n" + _plan_ntk(one, todo, named, encoder, mesh, rules, target)
        if all_weights_kernel and todo:
            text += (
                "\n\n"
                + plan_all_weights(one, todo, named, encoder, mesh, target, distinct_tokens)[0]
            )
        out.append(
            f"## {one.model} ({encoder[2].value} readout, {one.dtype}, batch {one.batch_size}, "
            f"{one.max_length} tokens)\n\n{text}"
        )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """The command line: ``experiments.run`` 's flags plus ``--topology``."""
    parser = build_parser("python -m experiments.plan", __doc__)
    parser.add_argument(
        "--topology",
        required=True,
        choices=list(topologies.TARGETS),
        help="the TPU slice or GPU nodes to compile for (compile-only devices; needs the tpu "
        "extra for TPU slices, the cuda-plan extra for h100-* / a100-*)",
    )
    parser.add_argument(
        "--dump-hlo",
        metavar="DIR",
        default=None,
        help="also write each compiled program's optimized HLO text to DIR",
    )
    parser.add_argument(
        "--all-weights-kernel",
        action="store_true",
        help="also plan the eNTK over every weight of the run's tasks (K([train; test] x "
        "train), the kernels of --ntk-kernel, embedding tables compacted); on a mesh with an "
        "fsdp axis the weights split over it",
    )
    parser.add_argument(
        "--distinct-tokens",
        type=int,
        default=None,
        metavar="N",
        help="distinct token ids in the kernel's rows, which size the compacted word table "
        "(default: the bound rows x max_length + labels)",
    )
    args = vars(parser.parse_args(argv))
    topology = args.pop("topology")
    all_weights, distinct = args.pop("all_weights_kernel"), args.pop("distinct_tokens")
    if distinct is not None and distinct < 1:
        parser.error(f"--distinct-tokens must be a positive count of token ids; got {distinct}.")
    if distinct is not None and not all_weights:
        parser.error(
            "--distinct-tokens sizes the all-weights kernel's tables: add --all-weights-kernel."
        )
    _DUMP["dir"] = args.pop("dump_hlo")
    flags = launch.pop_launch(args)
    cfg = config_from_args(parser, args)
    if hint := topologies.install_hint(topology):
        raise SystemExit(f"error: {hint}")
    jax.config.update("jax_platforms", "cpu")  # the TPU / GPU devices are compile-only
    if flags.coordinator or flags.num_processes or flags.distributed:
        print(
            "note: process flags are ignored: a plan compiles for all hosts at once.",
            file=sys.stderr,
        )
    try:
        print(plan(cfg, topology, flags, all_weights_kernel=all_weights, distinct_tokens=distinct))
    except UserError as err:
        raise SystemExit(f"error: {user_message(err)}") from err


if __name__ == "__main__":
    main()
