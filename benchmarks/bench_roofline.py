"""How close a training step is to this machine's GEMM rate: a roofline built from the dots.

  uv run python benchmarks/bench_roofline.py                         # the default workloads
  uv run python benchmarks/bench_roofline.py --workloads step:roberta-base job:mr:12

For each workload the script compiles the program as the library runs it, reads every dot of
the compiled HLO (its operand shapes and dimension numbers; a dot inside the training loop's
``while`` body counts once per step, one outside once per call), times each dot alone on its
own shapes (``lax.dot_general`` on row-major operands, best of 3), and prints:

- the step's time (best window, compiles excluded) and its dot GFLOP;
- the dots' time alone and their rate: the time these GEMMs take by themselves on this machine;
- ``bound``: step time / dots' time alone. No change that keeps these GEMMs (and their FLOPs)
  can make the step faster than this; only fewer FLOPs, or faster GEMMs, can.

For a vectorized job (``job:TASK:N``) the step is one step of all N members, and ``vs seq``
compares the job's dots alone, per member, with the sequential cell's whole step: the largest
speed-up over sequential cells that vectorizing could give on this machine.

Workloads:
  step:MODEL      ``bench_lora_step.py``'s training loop: B=8, T=128, LoRA r=8 on query/value,
                  classification head, AdamW (MODEL: minilm, roberta-base, small).
  cell:TASK       one cell of the default experiment (MiniLM-L6, prompt readout, rank 12,
                  packed batches), as ``experiments.run --no-vectorize`` trains it (TASK: mr,
                  trec).
  job:TASK:N      N such cells (ranks 1 and 12 alternating, one seed each) as one vectorized
                  job (``lora_jax.train.fit_job``), as ``experiments.run`` trains them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_DEF = re.compile(r"\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[([\d,]*)\]")
_COMP = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) ")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)\}?")


@dataclasses.dataclass(frozen=True)
class Dot:
    """One dot of a compiled program: operand shapes and ``lax.dot_general`` dimensions."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    contracting: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]

    @property
    def flops(self) -> float:
        """2 x (output elements) x (contracted size)."""
        lc, rc = self.contracting
        lb, rb = self.batch
        out = [d for i, d in enumerate(self.lhs) if i not in lc and i not in lb]
        out += [d for i, d in enumerate(self.rhs) if i not in rc and i not in rb]
        out += [self.lhs[i] for i in lb]
        return 2.0 * np.prod(out) * np.prod([self.lhs[i] for i in lc])


def _dims(line: str, name: str) -> tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", line)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def hlo_dots(text: str) -> tuple[Counter, Counter]:
    """The dots of an HLO module's text: ``(in_loop, outside)``, each a ``Counter[Dot]``.

    ``in_loop``: dots in the body of a ``while`` loop (or in computations it calls), which
    run once per iteration (a loop nested in that body is not multiplied out: the programs
    timed here have one loop); ``outside``: the others, which run once per call.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    callees: dict[str, set[str]] = {}
    bodies: set[str] = set()
    comp = ""
    dot_lines: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.startswith(" ") and (m := _COMP.match(line)):
            comp = m.group(1)
            callees.setdefault(comp, set())
            continue
        if m := _DEF.match(line):
            shapes[m.group(1)] = tuple(int(x) for x in m.group(3).split(",") if x)
        for group in _CALLS.findall(line):
            callees[comp].update(c.strip() for c in group.split(",") if c.strip())
        if " while(" in line and (b := re.search(r"body=(%[\w.\-]+)", line)):
            bodies.add(b.group(1))
        if " dot(" in line:
            dot_lines.append((comp, line))
    in_loop: set[str] = set()
    todo = list(bodies)
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo.extend(callees.get(c, ()))
    loop, outside = Counter(), Counter()
    for comp, line in dot_lines:
        ops = re.search(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
        dot = Dot(
            shapes[ops.group(1)],
            shapes[ops.group(2)],
            (_dims(line, "lhs_contracting_dims"), _dims(line, "rhs_contracting_dims")),
            (_dims(line, "lhs_batch_dims"), _dims(line, "rhs_batch_dims")),
        )
        (loop if comp in in_loop else outside)[dot] += 1
    return loop, outside


def time_dot(dot: Dot, repeats: int = 3) -> float:
    """Seconds of one ``dot`` alone (row-major float32 operands), best of ``repeats``."""
    a = jnp.full(dot.lhs, 0.01, jnp.float32)
    b = jnp.full(dot.rhs, 0.01, jnp.float32)
    f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (dot.contracting, dot.batch)))
    f(a, b).block_until_ready()
    calls = int(min(200, max(3, 1e9 / max(dot.flops, 1.0))))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


@dataclasses.dataclass
class Roofline:
    """A step's measured time against its dots, each timed alone; ``bound`` = their ratio."""

    step_s: float  # one iteration of the loop (a training step), measured
    gflop: float  # dot GFLOP per iteration
    dots_s: float  # the dots of one iteration, each timed alone

    @property
    def bound(self) -> float:
        return self.step_s / self.dots_s


def roofline(compiled, call_s: float, iterations: int) -> Roofline:
    """The dots of ``compiled`` (one call = ``iterations`` loop iterations taking ``call_s``)."""
    loop, outside = hlo_dots(compiled.as_text())
    cost = {d: time_dot(d) for d in set(loop) | set(outside)}

    def per_iteration(f: Callable[[Dot], float]) -> float:
        return sum(n * f(d) for d, n in loop.items()) + sum(
            n * f(d) / iterations for d, n in outside.items()
        )

    return Roofline(
        call_s / iterations, per_iteration(lambda d: d.flops) / 1e9, per_iteration(cost.get)
    )


def _best(run: Callable, fresh_state: Callable, repeats: int) -> float:
    """Best seconds of ``run(state)`` over ``repeats`` calls, each on a fresh state (made
    before the clock starts: the chunk donates it); one untimed call compiles first."""
    jax.block_until_ready(run(fresh_state()))
    best = float("inf")
    for _ in range(repeats):
        state = jax.block_until_ready(fresh_state())
        t0 = time.perf_counter()
        jax.block_until_ready(run(state))
        best = min(best, time.perf_counter() - t0)
    return best


def step_workload(model: str, steps: int, repeats: int):
    """bench_lora_step's training loop: (compiled chunk, seconds per call, steps per call)."""
    import bench_lora_step as bls  # benchmarks/, next to this script

    from lora_jax import lora, programs, train
    from lora_jax.models import EncoderConfig, create, from_pretrained, minilm_path, split
    from lora_jax.trainable import Method, make_model_fn

    if model == "minilm":
        encoder = from_pretrained(minilm_path(), head="cls", num_labels=2)
    else:
        shape = EncoderConfig(
            **bls.MODELS[model], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        encoder = create(shape, head="cls", num_labels=2, seed=0)
    apply_fn, params = split(encoder)
    ids, mask, labels = bls._batch(8, 128, encoder.config.vocab_size, 2)
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    data = {k: jnp.asarray(v, jnp.int32) for k, v in data.items()}
    cfg = lora.LoraConfig(
        r=8, alpha=16, targets=("query", "value"), modules_to_save=("classifier",)
    )
    tcfg = train.TrainConfig(
        steps=steps,
        eval_every=steps,
        batch_size=8,
        learning_rate=1e-4,
        weight_decay=0.01,
        max_grad_norm=None,
    )

    def output_fn(p, batch, dropout_rng=None):
        return apply_fn(p, batch["input_ids"], batch["attention_mask"])

    chunk = programs.make_train_chunk(
        make_model_fn(output_fn, Method.LORA, lora_config=cfg), train.make_optimizer(tcfg), tcfg
    )

    def state():
        # A copy: the chunk donates its state, and the classifier leaves are params' own.
        trainable = jax.tree.map(jnp.array, lora.init(jax.random.key(0), params, cfg))
        return train.init_state(trainable, train.make_optimizer(tcfg), 0)

    seconds = _best(lambda s: chunk(s, params, data), state, repeats)
    return chunk.lower(state(), params, data).compile(), seconds, steps


def cell_workloads(task: str, sizes: list[int], steps: int, repeats: int):
    """The default experiment's rank-12 cell of ``task``, and n cells as one job per n in
    ``sizes``."""
    import bench_sweep  # benchmarks/, next to this script

    from experiments.config import get_config
    from experiments.jobs import Cell, lora_config, train_config
    from experiments.workbench import Workbench
    from lora_jax import programs, tasks, train
    from lora_jax.trainable import Method, make_model_fn

    cfg = get_config("default", steps=steps, eval_every=steps)
    bench = Workbench(cfg, tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=cfg.k))
    output_fn, params = bench.prompt_model(task)
    tcfg = train_config(cfg, Cell(task, "lora", 12, 0))
    cells = [Cell(task, "lora", (1, 12)[i % 2], 1000 + i) for i in range(max(sizes + [2]))]
    datas = [d.train for d in bench.job_data(task, [c.seed for c in cells], mode="prompt")]
    configs = [lora_config(cfg, c.rank, bench.model_type) for c in cells]

    cell, config, data = cells[1], configs[1], datas[1]  # rank 12
    fn = make_model_fn(output_fn, Method.LORA, lora_config=config)
    chunk = programs.make_train_chunk(fn, train.make_optimizer(tcfg), tcfg)

    def state():
        return bench_sweep.seq_states(params, [cell], [config], tcfg)[0]

    length = programs.pack_length_needed(fn, state().rng, steps, data, tcfg.batch_size)
    seconds = _best(lambda s: chunk(s, params, data, steps, length), state, repeats)
    out = {
        f"cell:{task}": (
            chunk.lower(state(), params, data, steps, length).compile(),
            seconds,
            steps,
        )
    }
    for n in sizes:
        out[f"job:{task}:{n}"] = _job(
            cells[:n], configs[:n], datas[:n], params, output_fn, fn, tcfg, steps, repeats
        )
    return out


def _job(cells, configs, datas, params, output_fn, fn, tcfg, steps: int, repeats: int):
    """``cells`` as one vectorized job (``lora_jax.train.fit_job``), as ``experiments.run``
    trains them: (compiled chunk, seconds per call, steps per call)."""
    import bench_sweep

    from lora_jax import lora, members, programs
    from lora_jax.trainable import Method, make_model_fn

    seeds = [c.seed for c in cells]
    plan = lora.plan_stack(params, configs)
    vfn = lora.with_member_factors(
        make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    )
    vchunk = programs.job_programs(vfn, tcfg, member_inputs=True).chunk
    stacked, frozen = members.stack(datas), (params, plan.factors)
    states = bench_sweep.seq_states(params, cells, configs, tcfg)
    length = max(
        programs.pack_length_needed(fn, s.rng, steps, d, tcfg.batch_size)
        for s, d in zip(states, datas, strict=True)
    )

    def vstate():
        return bench_sweep.vec_state(params, plan, seeds, tcfg)

    seconds = _best(lambda s: vchunk(s, frozen, stacked, steps, False, length), vstate, repeats)
    return vchunk.lower(vstate(), frozen, stacked, steps, False, length).compile(), seconds, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--workloads",
        nargs="+",
        default=["step:minilm", "cell:trec", "job:trec:6", "cell:mr", "job:mr:6"],
    )
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed call")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls (best is kept)")
    args = ap.parse_args()

    built = {}
    jobs: dict[str, list[int]] = {}
    for w in args.workloads:
        if w.startswith("job:"):
            jobs.setdefault(w.split(":")[1], []).append(int(w.split(":")[2]))
    for w in args.workloads:
        kind, name = w.split(":")[:2]
        if w in built:
            continue
        if kind == "step":
            built[w] = step_workload(name, args.steps, args.repeats)
        elif kind in ("cell", "job"):
            built.update(cell_workloads(name, jobs.get(name, []), args.steps, args.repeats))
        else:
            raise SystemExit(
                f"unknown workload {w!r}; expected step:MODEL, cell:TASK or job:TASK:N"
            )

    print(
        f"\n{jax.devices()[0].platform}, {jax.device_count()} device(s); {args.steps} steps per "
        f"call, best of {args.repeats}"
    )
    print("| workload | step ms | dot GFLOP | dots alone ms | dot GFLOP/s | bound | vs seq |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for w in args.workloads:
        compiled, seconds, iterations = built[w]
        r = roofline(compiled, seconds, iterations)
        vs_seq = ""
        if w.startswith("job:"):  # the sequential cell's step against the job's dots per member
            _, task, n = w.split(":")
            _, cell_s, cell_steps = built[f"cell:{task}"]
            vs_seq = f"{cell_s / cell_steps / (r.dots_s / int(n)):.2f}x"
        print(
            f"| {w} | {1e3 * r.step_s:.1f} | {r.gflop:.2f} | {1e3 * r.dots_s:.1f} | "
            f"{r.gflop / r.dots_s:.0f} | {r.bound:.2f}x | {vs_seq} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
