"""A few-shot LoRA training run as ``experiments.run`` trains it, against PyTorch + PEFT.

  uv run python benchmarks/bench_fewshot_train.py --torch-python PATH      # TREC, r = 12
  uv run python benchmarks/bench_fewshot_train.py --task mr --rank 1 --torch-python PATH

Both sides train the embedded MiniLM-L6 (real weights) with the default experiment's prompt and
readout (TIED_MEAN: the mean of the final token states times the label words' embeddings),
LoRA on query/value (alpha = 2 r), AdamW at 3e-4 with gradient clipping at 1.0, batch 8, on the
task's k = 16 training set for seed 13, and each step on the same batch
(``programs.batch_schedule``).

- ours: ``programs.make_train_chunk`` over ``trainable.make_model_fn``'s default LoRA path, on
  packed batches (``lora_jax.packing``, what ``experiments.run`` trains) and, for reference, on
  padded ones (every batch at the split's longest row);
- PyTorch + PEFT: ``get_peft_model`` on transformers' ``BertModel``, each batch padded to its
  own longest row (what Hugging Face's ``DataCollatorWithPadding`` does), eager mode,
  ``torch.set_num_threads(--threads)``.

Timed: ``--steps`` steps after a warm-up (our compile is excluded and printed apart), best of
``--reps``, the sides alternating so that both see the same load. Step 0's loss (B = 0, so the
base model's) is printed for both sides as a check that they train the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch_python  # benchmarks/torch_python.py, next to this script


def torch_worker(args) -> None:
    """Runs in the torch interpreter: reads the batches, prints JSON lines of timings."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    d = np.load(args.torch_worker)
    model = AutoModel.from_pretrained(str(d["path"]), add_pooling_layer=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"], lora_dropout=0
        ),
    )
    model.eval()  # dropout off, as on our side (experiments train without it by default)
    words = model.get_input_embeddings().weight[torch.from_numpy(d["label_ids"])].detach()
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, types, labels = (torch.from_numpy(d[k]) for k in ("ids", "mask", "types", "labels"))
    schedule = d["schedule"]

    def run(steps: int) -> list[float]:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        losses = []
        for s in range(steps):
            idx = torch.from_numpy(schedule[s])
            width = int(mask[idx].sum(1).max())  # this batch's longest row
            m = mask[idx, :width]
            out = model(
                input_ids=ids[idx, :width], attention_mask=m, token_type_ids=types[idx, :width]
            )
            states = out.last_hidden_state
            w = m.unsqueeze(-1).to(states.dtype)
            pooled = (states * w).sum(1) / w.sum(1)
            loss = F.cross_entropy(pooled @ words.T, labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        return losses

    print(json.dumps({"loss0": run(1)[0]}), flush=True)
    for line in sys.stdin:  # one timed run per request
        t0 = time.perf_counter()
        run(args.steps)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        del line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="trec", choices=("trec", "mr"))
    ap.add_argument("--rank", type=int, default=12)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    torch_python.add_argument(ap)
    args = ap.parse_args()
    if args.torch_worker:
        return torch_worker(args)
    exe = torch_python.resolve(args.torch_python, "torch, transformers, peft")

    import jax
    import numpy as np

    from experiments.config import get_config
    from experiments.jobs import Cell, lora_config, train_config
    from experiments.workbench import Workbench
    from lora_jax import lora, programs, tasks, train
    from lora_jax.capabilities import capabilities_of
    from lora_jax.models import minilm_path
    from lora_jax.trainable import Method, make_model_fn

    cfg = get_config("default", steps=args.steps, lr=args.lr)
    bench = Workbench(cfg, tasks.resolve_tasks((args.task,), (), k=cfg.k))
    output_fn, params = bench.prompt_model(args.task)
    data = bench.data(args.task, 13, mode="prompt").train
    lcfg = lora_config(cfg, args.rank, bench.model_type)
    tcfg = train_config(cfg, Cell(args.task, "lora", args.rank, 13))
    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=lcfg)
    optimizer = train.make_optimizer(tcfg)
    chunk = programs.make_train_chunk(model_fn, optimizer, tcfg)

    def fresh():
        return train.init_state(lora.init(jax.random.key(13), params, lcfg), optimizer, 13)

    n = len(data["labels"])
    schedule = programs.batch_schedule(fresh().rng, args.steps, n, tcfg.batch_size)
    packed = programs.pack_length_needed(model_fn, fresh().rng, args.steps, data, tcfg.batch_size)
    lengths = np.asarray(data["attention_mask"]).sum(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batches.npz")
        np.savez(
            path,
            path=str(minilm_path()),
            label_ids=np.asarray(capabilities_of(output_fn).embedding_rows),
            ids=np.asarray(data["input_ids"]).astype(np.int64),
            mask=np.asarray(data["attention_mask"]).astype(np.int64),
            types=np.asarray(data["token_type_ids"]).astype(np.int64),
            labels=np.asarray(data["labels"]).astype(np.int64),
            schedule=schedule.astype(np.int64),
        )
        worker = subprocess.Popen(
            [exe, __file__, "--torch-worker", path, "--rank", str(args.rank), "--steps",
             str(args.steps), "--threads", str(args.threads), "--lr", str(args.lr)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        torch_loss0 = json.loads(worker.stdout.readline())["loss0"]

        ours = {}
        for name, pack in (("packed", packed), ("padded", 0)):
            t0 = time.perf_counter()
            _, losses = chunk(fresh(), params, data, args.steps, pack or None)
            losses.block_until_ready()
            ours[name] = {"compile": time.perf_counter() - t0, "loss0": float(losses[0]), "t": []}
        torch_t = []
        for _ in range(args.reps):
            for name in ours:
                state = fresh()
                t0 = time.perf_counter()
                chunk(state, params, data, args.steps, packed if name == "packed" else None)[
                    1
                ].block_until_ready()
                ours[name]["t"].append(time.perf_counter() - t0)
            worker.stdin.write("go\n")
            worker.stdin.flush()
            torch_t.append(json.loads(worker.stdout.readline())["seconds"])
        worker.stdin.close()
        worker.wait()

    width = data["input_ids"].shape[1]
    rows = schedule.reshape(-1)
    per_batch = lengths[schedule].max(1)
    print(
        f"\nMiniLM-L6, task {args.task} (seed 13, {n} examples, {width} tokens at the longest, "
        f"{lengths.mean():.1f} on average), LoRA r={args.rank} on query/value, batch "
        f"{tcfg.batch_size}, {args.steps} steps, best of {args.reps}; {args.threads} threads; "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        f"tokens per step: packed {packed}, padded {tcfg.batch_size * width}, PyTorch "
        f"(each batch at its longest) {tcfg.batch_size * per_batch.mean():.0f} on average; real "
        f"{lengths[rows].sum() / args.steps:.0f}"
    )
    print(
        f"step-0 loss (base model): ours {ours['packed']['loss0']:.6f} packed, "
        f"{ours['padded']['loss0']:.6f} padded; PyTorch {torch_loss0:.6f}"
    )
    best_torch = min(torch_t)
    print("| implementation | ms / step (best) | median | speed-up vs PyTorch + PEFT | compile s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in ours.items():
        best = min(r["t"])
        print(
            f"| lora-jax, {name} batches | {1e3 * best / args.steps:.1f} | "
            f"{1e3 * float(np.median(r['t'])) / args.steps:.1f} | {best_torch / best:.2f}x | "
            f"{r['compile']:.1f} |"
        )
    print(
        f"| PyTorch + PEFT, each batch at its longest row | {1e3 * best_torch / args.steps:.1f} | "
        f"{1e3 * float(np.median(torch_t)) / args.steps:.1f} | 1.00x | |"
    )


if __name__ == "__main__":
    main()
