"""One LoRA training step (forward + backward + AdamW update): lora_jax vs full fine-tuning vs
PyTorch + PEFT, on the same model shape, batch and sequence length.

  uv run python benchmarks/bench_lora_step.py --compare --torch-python PATH   # both sides
  uv run python benchmarks/bench_lora_step.py --compare --models minilm --steps 5 --reps 6 \
      --torch-python PATH   # or set LORA_JAX_TORCH_PYTHON=PATH

The train-loop row times what `experiments.run` trains: `programs.make_train_chunk` over
`trainable.make_model_fn`'s default LoRA path (`--fused auto`: per module fused where
3 r (in + out) < in * out, which is every module of these shapes at r=8).

Models: `roberta-base` (random RoBERTa-base-shaped weights: 12 layers, hidden 768, vocab 50265,
sequence-classification head), `minilm` (the real all-MiniLM-L6-v2 weights from
`lora_jax.models.minilm_path()`, BERT, 6 layers, hidden 384) and `small` (4 layers, hidden 256).
LoRA: targets query/value, r=8, alpha=16, classifier trained in full (PEFT's SEQ_CLS
modules_to_save); base frozen. Dropout off on both sides. CPU, `--threads` intra-op threads on
both sides (torch.set_num_threads; XLA's CPU thread pool is limited with taskset to the same
number of cores by --compare).

`--compare` starts one worker subprocess per configuration (`--impl ...`, which warms up, prints
a JSON line, then times windows of `--steps` steps on request), and interleaves `--reps` timed
windows across the workers so that all of them see the same background load; it reports the best
and the median window per configuration and the ratio of best windows to torch + PEFT LoRA.

Read the figures together with the load average that is printed per window: on an
oversubscribed machine torch's OpenMP threads slow down far more than XLA's thread pool (a
1024x256x256 matmul went from about 1 ms to 15 ms in torch and from 1.2 ms to 2 ms in XLA), so a
fair comparison needs an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch_python  # benchmarks/torch_python.py, next to this script

MODELS = {
    "roberta-base": dict(
        model_type="roberta",
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
    ),
    "small": dict(
        model_type="roberta",
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
    ),
    "minilm": None,  # real weights
}


def _batch(batch: int, seq: int, vocab: int, num_labels: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0  # one padded row, as real batches have
    labels = rng.integers(0, num_labels, size=(batch,)).astype(np.int64)
    return ids, mask, labels


def _serve(step, warmup: int, info: dict, steps_per_call: int = 1) -> None:
    """Worker loop: warm up, print one JSON line, then time windows on request.

    Reads lines from stdin: an integer n runs n steps and prints `{"rate": steps/s}`; "quit"
    ends. The driver alternates windows across workers so every implementation sees the same
    background load (the machine this was written on is shared). ``step`` may run
    ``steps_per_call`` steps at once (the scanned training loop).
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    print(json.dumps(dict(info, first_step_s=time.perf_counter() - t0)), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        calls = max(int(line) // steps_per_call, 1)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        rate = calls * steps_per_call / (time.perf_counter() - t0)
        print(json.dumps({"rate": rate}), flush=True)


def run_jax(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from lora_jax import lora
    from lora_jax.models import EncoderConfig, create, from_pretrained, minilm_path, split

    num_labels = 2
    if args.model == "minilm":
        model = from_pretrained(minilm_path(), head="cls", num_labels=num_labels)
    else:
        model = create(
            EncoderConfig(
                **MODELS[args.model], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
            ),
            head="cls",
            num_labels=num_labels,
            seed=0,
        )
    apply_fn, params = split(model)
    vocab = model.config.vocab_size
    ids, mask, labels = (
        jnp.asarray(x, jnp.int32) for x in _batch(args.batch, args.seq, vocab, num_labels)
    )
    opt = optax.adamw(1e-4, weight_decay=0.01)
    cfg = lora.LoraConfig(
        r=args.r, alpha=2 * args.r, targets=("query", "value"), modules_to_save=("classifier",)
    )
    fusion = {"auto": "auto", "1": "fused", "0": "merged"}[args.fused]

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    if args.mode == "lora":
        trainable = lora.init(jax.random.key(0), params, cfg)

        def loss_fn(adapters, base):
            return xent(apply_fn(lora.apply(base, adapters, cfg, fusion=fusion), ids, mask))

    else:
        trainable = params

        def loss_fn(p, base):
            del base
            return xent(apply_fn(p, ids, mask))

    frozen = params if args.mode == "lora" else {}

    @jax.jit
    def step(trainable, opt_state, frozen):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    state = {"t": trainable, "o": opt.init(trainable)}

    def one():
        state["t"], state["o"], loss = step(state["t"], state["o"], frozen)
        loss.block_until_ready()

    steps_per_call = 1
    if args.loop:
        # The real training loop: `lora_jax.programs.make_train_chunk`, a jitted lax.scan of
        # `--steps` steps that gathers each batch on the device (here from the one batch).
        from lora_jax import programs, train

        steps_per_call = args.steps
        tcfg = train.TrainConfig(
            steps=steps_per_call,
            eval_every=steps_per_call,
            batch_size=args.batch,
            learning_rate=1e-4,
            weight_decay=0.01,
            max_grad_norm=None,
        )
        data = {"input_ids": ids, "attention_mask": mask, "labels": labels}

        from lora_jax.trainable import Method, make_model_fn

        def output_fn(p, batch, dropout_rng=None):
            return apply_fn(p, batch["input_ids"], batch["attention_mask"])

        # The model function experiments train (`--fused auto`: its default LoRA path).
        method = Method.LORA if args.mode == "lora" else Method.FULL
        model_fn = make_model_fn(output_fn, method, lora_config=cfg, fusion=fusion)

        chunk = programs.make_train_chunk(model_fn, train.make_optimizer(tcfg), tcfg)
        tstate = {"s": train.init_state(trainable, train.make_optimizer(tcfg), 0)}

        def one():
            tstate["s"], losses = chunk(tstate["s"], frozen, data)
            losses.block_until_ready()

    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    info = dict(
        impl="jax",
        model=args.model,
        mode=args.mode,
        fusion=fusion,
        loop=bool(args.loop),
        batch=args.batch,
        seq=args.seq,
        r=args.r,
        trainable=int(n_train),
        device=str(jax.devices()[0].platform),
    )
    _serve(one, args.warmup, info, steps_per_call)


def run_torch(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_labels = 2
    if args.model == "minilm":
        config = AutoConfig.from_pretrained(
            args.minilm_path,
            num_labels=num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = AutoModelForSequenceClassification.from_pretrained(args.minilm_path, config=config)
    else:
        kw = {k: v for k, v in MODELS[args.model].items() if k != "model_type"}
        config = RobertaConfig(
            **kw, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        model = RobertaForSequenceClassification(config)
    vocab = model.config.vocab_size
    ids, mask, labels = (
        torch.from_numpy(x) for x in _batch(args.batch, args.seq, vocab, num_labels)
    )
    if args.mode == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                task_type="SEQ_CLS",
                r=args.r,
                lora_alpha=2 * args.r,
                target_modules=["query", "value"],
                lora_dropout=0.0,
            ),
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def one():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()

    info = dict(
        impl="torch",
        model=args.model,
        mode=args.mode,
        fusion="auto",
        batch=args.batch,
        seq=args.seq,
        r=args.r,
        trainable=sum(p.numel() for p in params),
        device="cpu",
        torch=torch.__version__,
    )
    _serve(one, args.warmup, info)


class _Worker:
    """One benchmark subprocess (see `_serve`)."""

    def __init__(self, name: str, python: str, argv: list[str], threads: int):
        cmd = [python, os.path.abspath(__file__), *argv]
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(threads),
        )
        if shutil.which("taskset") and threads < (os.cpu_count() or threads):
            cmd = ["taskset", "-c", f"0-{threads - 1}", *cmd]
        self.name, self.rates = name, []
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info: dict = {}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} died:\n{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def ready(self) -> None:
        self.info = self._read()

    def window(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        rate = self._read()["rate"]
        self.rates.append(rate)
        return rate

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def compare(args) -> None:
    torch_py = torch_python.resolve(args.torch_python, "torch, peft")
    minilm = subprocess.run(
        [sys.executable, "-c", "from lora_jax.models import minilm_path; print(minilm_path())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    common = [
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--r",
        str(args.r),
        "--threads",
        str(args.threads),
        "--minilm-path",
        minilm,
        "--warmup",
        str(args.warmup),
    ]
    jax_py = sys.executable
    runs = [
        ("jax lora fused", jax_py, ["--impl", "jax", "--mode", "lora", "--fused", "1"]),
        (
            "jax lora as experiments (auto path), train loop",
            jax_py,
            [
                "--impl",
                "jax",
                "--mode",
                "lora",
                "--fused",
                "auto",
                "--loop",
                "1",
                "--steps",
                str(args.steps),
            ],
        ),
        ("jax lora merged", jax_py, ["--impl", "jax", "--mode", "lora", "--fused", "0"]),
        ("jax full", jax_py, ["--impl", "jax", "--mode", "full"]),
        ("torch+peft lora", torch_py, ["--impl", "torch", "--mode", "lora"]),
        ("torch full", torch_py, ["--impl", "torch", "--mode", "full"]),
    ]
    if not args.full:
        runs = [r for r in runs if "full" not in r[0]]
    rows = []
    for model in args.models.split(","):
        # Start (and compile / warm up) one worker at a time, then interleave timed windows.
        workers = []
        for name, py, argv in runs:
            w = _Worker(name, py, [*argv, "--model", model, *common], args.threads)
            w.ready()
            workers.append(w)
        for rep in range(args.reps):
            order = workers[rep % len(workers) :] + workers[: rep % len(workers)]
            for w in order:
                w.window(args.steps)
            print(
                f"{model} window {rep + 1}/{args.reps}: load {os.getloadavg()[0]:.1f}; "
                + ", ".join(f"{w.name} {w.rates[-1]:.3f}" for w in workers),
                flush=True,
            )
        for w in workers:
            w.close()
        ref = max(next(w for w in workers if w.name == "torch+peft lora").rates)
        for w in workers:
            best, med = max(w.rates), sorted(w.rates)[len(w.rates) // 2]
            rows.append((model, w.name, best, med, best / ref, w.info["trainable"]))
    print(
        f"\nbatch {args.batch}, seq {args.seq}, r {args.r}, {args.threads} CPU threads per side; "
        f"{args.reps} interleaved windows of {args.steps} steps; load avg now "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| model | implementation | trainable | steps/s best | median | best vs torch+peft |")
    print("|---|---|---:|---:|---:|---:|")
    for model, name, best, med, ratio, n in rows:
        print(f"| {model} | {name} | {n:,} | {best:.3f} | {med:.3f} | {ratio:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--impl", choices=["jax", "torch"], help="run one worker (stdin protocol)")
    ap.add_argument("--compare", action="store_true", help="drive jax and torch workers")
    ap.add_argument("--model", default="roberta-base", choices=sorted(MODELS))
    ap.add_argument("--models", default="small,minilm,roberta-base", help="--compare: models")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument(
        "--fused",
        default="1",
        choices=["1", "0", "auto"],
        help="jax lora: 1 fused, 0 merged kernels, auto per-module rule",
    )
    ap.add_argument("--full", type=int, default=1, help="--compare: also full fine-tuning")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed window")
    ap.add_argument("--reps", type=int, default=4, help="interleaved timed windows per worker")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--loop",
        type=int,
        default=0,
        help="1: time lora_jax.train's scanned chunk of --steps steps instead of a jitted step",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minilm-path", default=None)
    torch_python.add_argument(ap)
    args = ap.parse_args()
    if args.compare:
        compare(args)
    elif args.impl == "jax":
        run_jax(args)
    elif args.impl == "torch":
        if args.model == "minilm" and not args.minilm_path:
            sys.exit("--impl torch --model minilm needs --minilm-path (printed by --compare)")
        run_torch(args)
    else:
        ap.error("give --impl jax|torch or --compare")


if __name__ == "__main__":
    main()
