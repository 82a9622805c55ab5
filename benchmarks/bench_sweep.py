"""n LoRA cells one after another vs the same n cells as one vectorized job (train.fit_job).

  uv run python benchmarks/bench_sweep.py                      # n = 2, 6, 12, 30
  uv run python benchmarks/bench_sweep.py --n 2 6 --steps 10 --reps 2
  uv run python benchmarks/bench_sweep.py --task trec --no-pack   # padded batches

The cells are those of the default experiment (``experiments.config`` default): the embedded
MiniLM-L6 with its prompt readout on ``--task`` (``mr``: k = 16, 32 training examples; ``trec``:
96) padded to the cells' longest row (at most 48 tokens, as in a job), batch 8, AdamW at 3e-4,
LoRA on query/value, ranks alternating 1 and 12 (alpha = 2 r), one few-shot sample and seed per
cell. Both sides train on packed batches (``lora_jax.packing``, as ``experiments.run`` does;
each cell packed to its own schedule's longest batch, the job to its members' longest) unless
``--no-pack``.
Sequential: each cell's own compiled chunk (``programs.make_train_chunk`` over
``trainable.make_model_fn``'s default LoRA path, what ``experiments.run --no-vectorize``
trains); vectorized: one ``programs.job_programs`` chunk for all n (ranks padded to 12, fused
path). Timed:
``--steps`` training steps per cell, after a warm-up call (compiles excluded), best of
``--reps``; the two sides alternate in each rep so both see the same background load.
Memory: XLA's ``memory_analysis()`` of the compiled vectorized chunk (temporaries + arguments +
outputs), and per member the increase from the smallest n.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from experiments.config import get_config
from experiments.jobs import Cell, lora_config, train_config
from experiments.workbench import Workbench
from lora_jax import lora, members, programs, tasks, train
from lora_jax.trainable import Method, make_model_fn


def _block(tree) -> None:
    jax.tree.map(lambda x: x.block_until_ready(), tree)


def seq_states(params, cells, configs, tcfg) -> list[train.TrainState]:
    """Fresh states of the cells, each as ``experiments.run`` initializes it."""
    return [
        train.init_state(
            lora.init(jax.random.key(c.seed), params, lc), train.make_optimizer(tcfg), c.seed
        )
        for c, lc in zip(cells, configs, strict=True)
    ]


def vec_state(params, plan, seeds, tcfg) -> train.TrainState:
    """The stacked fresh state of the same cells as one sweep."""
    adapters = lora.init_stack(params, plan, seeds)
    return train.init_states(adapters, tcfg, [tcfg.learning_rate] * len(seeds), seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 6, 12, 30], help="cells per job")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 12])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--task", default="mr", choices=("mr", "trec"))
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    task = args.task

    cfg = get_config("default", steps=args.steps, eval_every=args.steps)
    bench = Workbench(cfg, tasks.resolve_tasks(cfg.tasks, cfg.task_files, k=cfg.k))
    output_fn, params = bench.prompt_model(task)
    tcfg = train_config(cfg, Cell(task, "lora", args.ranks[0], 0))
    seq_fns = {
        r: make_model_fn(output_fn, Method.LORA, lora_config=lora_config(cfg, r, bench.model_type))
        for r in args.ranks
    }
    seq_chunks = {
        r: programs.make_train_chunk(f, train.make_optimizer(tcfg), tcfg)
        for r, f in seq_fns.items()
    }

    rows, mem = [], {}
    for n in args.n:
        cells = [Cell(task, "lora", args.ranks[i % len(args.ranks)], 1000 + i) for i in range(n)]
        datas = [d.train for d in bench.job_data(task, [c.seed for c in cells], mode="prompt")]
        configs = [lora_config(cfg, c.rank, bench.model_type) for c in cells]
        seeds = [c.seed for c in cells]

        plan = lora.plan_stack(params, configs)
        vec_fn = lora.with_member_factors(
            make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
        )
        vchunk = programs.job_programs(vec_fn, tcfg, member_inputs=True).chunk
        stacked = members.stack(datas)
        frozen = (params, plan.factors)
        states = seq_states(params, cells, configs, tcfg)
        packs = [  # each cell's packed length, and the job's (0: padded batches)
            programs.pack_length_needed(seq_fns[c.rank], st.rng, args.steps, d, tcfg.batch_size)
            if args.pack
            else 0
            for c, st, d in zip(cells, states, datas, strict=True)
        ]
        vpack = max(packs)

        compiled = vchunk.lower(
            vec_state(params, plan, seeds, tcfg), frozen, stacked, args.steps, False, vpack or None
        ).compile()
        m = compiled.memory_analysis()
        mem[n] = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

        # Warm up (compile) both sides: every (rank, packed length) of the cells.
        first = {
            (c.rank, p): (st, d) for c, st, d, p in zip(cells, states, datas, packs, strict=True)
        }
        for (rank, p), (st, d) in first.items():
            _block(seq_chunks[rank](st, params, d, args.steps, p or None))
        _block(
            vchunk(
                vec_state(params, plan, seeds, tcfg),
                frozen,
                stacked,
                args.steps,
                False,
                vpack or None,
            )
        )

        seq_t, vec_t = [], []
        for _ in range(args.reps):
            states = seq_states(params, cells, configs, tcfg)
            t0 = time.perf_counter()
            for st, c, d, p in zip(states, cells, datas, packs, strict=True):
                _block(seq_chunks[c.rank](st, params, d, args.steps, p or None))
            seq_t.append(time.perf_counter() - t0)
            state = vec_state(params, plan, seeds, tcfg)
            t0 = time.perf_counter()
            _block(vchunk(state, frozen, stacked, args.steps, False, vpack or None))
            vec_t.append(time.perf_counter() - t0)
        rows.append((n, min(seq_t), min(vec_t), os.getloadavg()[0]))
        print(f"n={n}: sequential {min(seq_t):.2f} s, vectorized {min(vec_t):.2f} s", flush=True)

    n0 = min(mem)
    print(
        f"\nMiniLM-L6 default-experiment cells (task {task}, {len(datas[0]['labels'])} examples, "
        f"{datas[0]['input_ids'].shape[1]} tokens, "
        f"{f'packed to {vpack} per batch' if args.pack else 'padded batches'}, batch 8, ranks "
        f"{args.ranks} alternating); {args.steps} steps per cell, best of {args.reps}; "
        f"{jax.devices()[0].platform}, load avg at the end {os.getloadavg()[0]:.1f}"
    )
    print(
        "| n cells | sequential s | vectorized s | speed-up | ms/cell-step seq | vec "
        "| XLA MiB | MiB/member |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, s, v, _ in rows:
        per = (mem[n] - mem[n0]) / (n - n0) / 2**20 if n > n0 else float("nan")
        print(
            f"| {n} | {s:.2f} | {v:.2f} | {s / v:.2f}x | {1e3 * s / (n * args.steps):.1f} | "
            f"{1e3 * v / (n * args.steps):.1f} | {mem[n] / 2**20:.0f} | {per:.1f} |"
        )


if __name__ == "__main__":
    main()
