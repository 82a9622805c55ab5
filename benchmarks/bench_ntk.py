"""Benchmark: empirical NTK of MiniLM-L6's K = 2 label-word logits, per implementation.

For each parameter subset (LoRA adapters on query/value at r = 1 and r = 8; a smaller
full-parameter subset, the last encoder layer; optionally all 22.7M weights) and each
implementation (``ntk.empirical_ntk_fn`` with neural-tangents' JACOBIAN_CONTRACTION,
NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES, and a direct ``jax.jacrev`` + einsum baseline),
one subprocess computes an (n x n) kernel block and reports compile time, run time (second
call) and peak resident memory (``getrusage`` maxrss, model load included; the RSS after
loading is printed too). Then the 1,000 test x 64 train kernel (LoRA r = 8) is computed once
on the CPU with the fastest implementation.

Readout: tied (outputs = hidden state at [MASK] @ word_embeddings[label_ids].T; MiniLM has no
MLM head); MR sentences with the template ``{sentence} It was [MASK] .``, T = 64.

``--compare`` (all weights, against PyTorch): the ``--n`` x ``--n`` train kernel (``x2=None``,
``trace_axes=()``) by ``ntk.empirical_ntk_fn`` (JACOBIAN_CONTRACTION, ``vmap_axes=0``,
``batch_size=--block``, default n: one block, computed by one fused program; embedding
tables compacted, trailing padding cut), and by ``torch.func`` ``vmap(jacrev)`` + einsum on the same
weights and batch (the LM-Kernel-FT recipe: per-example Jacobians in chunks of
``--torch-chunk``, one ``[N, K, P]`` matrix, one einsum) in the interpreter given by
``--torch-python`` (or ``$LORA_JAX_TORCH_PYTHON``). Each side runs in its own process, one
after the other; first call (compile / warm-up included) and second call are reported, with
the two kernels' relative difference. ``--big`` adds the 1,000 test x ``--n`` train
all-weights kernel (ours only): time and peak RSS. ``--kernels sgd signgd asigngd`` also times
our other optimizer kernels (``ntk.Kernel``) on the same rows, each in its own process, against
the SGD eNTK (the first listed is compared with torch).

Usage:
  uv run python benchmarks/bench_ntk.py               # the table (n = 16) + the 1000 x 64 run
  uv run python benchmarks/bench_ntk.py --n 8 --skip-big --subsets lora_r1 all
  uv run python benchmarks/bench_ntk.py --compare --n 64 --torch-python PATH [--big]
  uv run python benchmarks/bench_ntk.py --compare --n 64 --kernels sgd asigngd signgd [...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch_python  # benchmarks/torch_python.py, next to this script

SUBSETS = ("lora_r1", "lora_r8", "layer5", "all")
_NT = ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES")
# ":vmap0" runs the implementation with vmap_axes=0 (the encoder is independent per example):
# nt then computes per-example Jacobians instead of the Jacobian of the whole block.
IMPLS = (*(f"{n}:vmap0" for n in _NT), *_NT, "jacrev")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load(n_train: int, n_test: int, max_length: int):
    """MiniLM (tied readout), MR batches, and the label-word ids."""
    import numpy as np

    from lora_jax import models, tasks
    from lora_jax.readout import make_output_fn

    path = models.minilm_path()
    model = models.from_pretrained(path, head=None)
    apply_fn, params = models.split(model)
    tokenizer = models.load_tokenizer(path)
    task = tasks.get_task("mr")
    k = max(n_train // task.num_labels, 1)
    splits = tasks.few_shot_splits(task, k=k, seed=13, test_cap=max(n_test, 1))
    train = tasks.encode(splits.train, tokenizer, task, max_length=max_length)
    test = tasks.encode(splits.test, tokenizer, task, max_length=max_length)
    ids = tasks.label_word_ids(tokenizer, task)
    output_fn = make_output_fn(apply_fn, "tied", label_word_ids=ids)

    def strip(b, n):
        return {k: np.asarray(v)[:n] for k, v in b.items()}

    return output_fn, params, strip(train, n_train), strip(test, n_test)


def subset_fn(name: str, output_fn, params):
    """``ntk.KernelModel(f, sub_params, info)`` for a subset name."""
    import jax

    import ntk
    from lora_jax import lora

    if name.startswith("lora_r"):
        r = int(name.removeprefix("lora_r"))
        cfg = lora.LoraConfig(r=r, alpha=2.0 * r, targets=("query", "value"))
        adapters = lora.init(jax.random.PRNGKey(0), params, cfg)
        # B = 0 at init makes the A-block of the kernel vanish; take a point after some
        # training instead, so every adapter leaf contributes.
        adapters = jax.tree.map(
            lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(1), a.shape, a.dtype),
            adapters,
        )
        return ntk.lora_kernel_model(output_fn, params, adapters, cfg)
    if name == "layer5":
        return ntk.kernel_model(output_fn, params, r"encoder\.layer\.5\.")
    if name == "all":
        return ntk.kernel_model(output_fn, params, "all")
    raise ValueError(f"unknown subset {name!r}; expected one of {SUBSETS}")


def jacrev_kernel_fn(f):
    """The baseline: full Jacobians by ``jax.jacrev``, flattened, contracted with einsum."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def kernel(x1, x2, params):
        def jac(x):
            leaves = jax.tree.leaves(jax.jacrev(f)(params, x))
            n, k = leaves[0].shape[:2]
            return jnp.concatenate([j.reshape(n, k, -1) for j in leaves], axis=-1)  # (N, K, P)

        return jnp.einsum("akp,blp->abkl", jac(x1), jac(x2))

    return kernel


def worker(args) -> dict:
    """One (subset, implementation) measurement in this process."""
    import jax
    import numpy as np

    import ntk

    output_fn, params, train, _ = load(2 * args.n, 1, args.max_length)
    f, sub, info = subset_fn(args.subset, output_fn, params)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(sub)))
    x1 = {k: v[: args.n] for k, v in train.items()}
    x2 = {k: v[args.n : 2 * args.n] for k, v in train.items()}
    rss_loaded = _rss_mib()
    if args.impl == "jacrev":
        fn = jacrev_kernel_fn(f)
        run = lambda: np.asarray(fn(x1, x2, sub))  # noqa: E731
    else:
        name, _, vmap = args.impl.partition(":")
        ntk_fn = ntk.empirical_ntk_fn(
            f,
            trace_axes=(),
            implementation=ntk.NtkImplementation[name],
            batch_size=args.n,
            vmap_axes=0 if vmap == "vmap0" else None,
            model_info=info,
        )
        run = lambda: ntk_fn(x1, x2, sub)  # noqa: E731
    t = time.perf_counter()
    k = run()
    first = time.perf_counter() - t
    second = float("inf")
    for _ in range(args.repeat):  # the machine may be shared: keep the fastest run
        t = time.perf_counter()
        k = run()
        second = min(second, time.perf_counter() - t)
    return {
        "subset": args.subset,
        "impl": args.impl,
        "n": args.n,
        "params": n_params,
        "first_s": first,
        "run_s": second,
        "compile_s": first - second,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_mib": _rss_mib(),
        "kernel_fro": float(np.linalg.norm(k)),
        "kernel_00": np.asarray(k)[0, 0].ravel().tolist(),
    }


def big(args) -> dict:
    """The 1,000 x 64 LoRA r = 8 kernel (trace_axes=(), [1000, 64, 2, 2]) on this CPU."""
    import jax
    import numpy as np

    import ntk

    output_fn, params, train, test = load(64, 1000, args.max_length)
    f, sub, info = subset_fn("lora_r8", output_fn, params)
    name, _, vmap = args.big_impl.partition(":")
    batch = tuple(int(b) for b in args.big_batch.split(","))
    ntk_fn = ntk.empirical_ntk_fn(
        f,
        trace_axes=(),
        implementation=ntk.NtkImplementation[name],
        batch_size=batch,
        vmap_axes=0 if vmap == "vmap0" else None,
        progress=True,
        model_info=info,
    )
    rss_loaded = _rss_mib()
    t = time.perf_counter()
    k = ntk_fn(test, train, sub)
    seconds = time.perf_counter() - t
    return {
        "subset": "lora_r8",
        "impl": args.big_impl,
        "shape": list(k.shape),
        "batch_size": args.big_batch,
        "kernel_fro": float(np.linalg.norm(k)),
        "params": int(sum(np.size(x) for x in jax.tree.leaves(sub))),
        "seconds": seconds,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_mib": _rss_mib(),
        "devices": str(jax.devices()),
    }


def ours_all(args) -> dict:
    """Our all-weights ``n x n`` train kernel (x2=None), first and second call."""
    import numpy as np

    import ntk

    output_fn, params, train, test = load(args.n, args.test_rows, args.max_length)
    f, sub, info = subset_fn("all", output_fn, params)
    sizes = tuple(int(b) for b in args.batch.split(","))
    batch = sizes[0] if len(sizes) == 1 else sizes
    x, out = (train, None) if not args.test_rows else (test, train)

    def run():  # a new ntk_fn per call: the second call shows the session's program cache
        fn = ntk.empirical_ntk_fn(
            f,
            trace_axes=(),
            vmap_axes=0,
            batch_size=batch,
            progress=bool(args.test_rows),
            model_info=info,
            kernel=args.kernel,
        )
        return fn(x, out, sub)

    rss_loaded = _rss_mib()
    t, c = time.perf_counter(), time.process_time()
    k = run()
    first, first_cpu = time.perf_counter() - t, time.process_time() - c
    second = second_cpu = None
    if not args.test_rows:
        t, c = time.perf_counter(), time.process_time()
        k = run()
        second, second_cpu = time.perf_counter() - t, time.process_time() - c
    if args.save:
        np.save(args.save, k)
    return {
        "side": "lora_jax" if args.kernel == "sgd" else f"lora_jax ({args.kernel})",
        "shape": list(k.shape),
        "first_s": first,
        "second_s": second,
        "first_cpu_s": first_cpu,
        "second_cpu_s": second_cpu,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_mib": _rss_mib(),
    }


def torch_all(args) -> dict:
    """The PyTorch baseline (runs under --torch-python): torch.func vmap(jacrev) + einsum."""
    import numpy as np
    import torch
    from torch.func import functional_call, jacrev, vmap
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    data = np.load(args.batch_file)
    # Eager attention: SDPA checks `padding_mask.all()`, data-dependent control flow vmap rejects.
    model = AutoModel.from_pretrained(args.minilm_path, attn_implementation="eager").eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    words = torch.from_numpy(data["label_word_ids"]).long()
    ids, mask = (torch.from_numpy(data[k]).long() for k in ("input_ids", "attention_mask"))
    pos = torch.from_numpy(data["mask_pos"]).long()
    n_params = sum(v.numel() for v in params.values())

    def f(p, ids, mask, pos):  # one example -> (K,): hidden state at [MASK] . label-word rows
        # A 4-D additive mask: transformers then skips its mask building, whose data-dependent
        # "all ones?" shortcut vmap rejects.
        t = ids.shape[0]
        add = (1.0 - mask.float())[None, None, None, :] * torch.finfo(torch.float32).min
        states = functional_call(
            model, p, (ids[None],), {"attention_mask": add.expand(1, 1, t, t)}
        ).last_hidden_state[0]  # (T, H)
        hidden = torch.index_select(states, 0, pos.reshape(1))[0]  # (H,); vmap-safe indexing
        return hidden @ p["embeddings.word_embeddings.weight"][words].T

    jac = vmap(jacrev(f), in_dims=(None, 0, 0, 0))

    def kernel():
        n, k = ids.shape[0], words.shape[0]
        j = torch.empty(n, k, n_params)  # (N, K, P)
        for s in range(0, n, args.torch_chunk):
            js = jac(
                params,
                ids[s : s + args.torch_chunk],
                mask[s : s + args.torch_chunk],
                pos[s : s + args.torch_chunk],
            )
            at = 0
            for leaf in js.values():  # (c, K, *shape): copy into place, leaf by leaf
                size = leaf[0, 0].numel()
                j[s : s + leaf.shape[0], :, at : at + size] = leaf.reshape(*leaf.shape[:2], -1)
                at += size
            del js
        return torch.einsum("akp,blp->abkl", j, j)

    with torch.no_grad():
        rss_loaded = _rss_mib()
        t, c = time.perf_counter(), time.process_time()
        k = kernel()
        first, first_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        k = kernel()
        second, second_cpu = time.perf_counter() - t, time.process_time() - c
    if args.save:
        np.save(args.save, k.numpy())
    return {
        "side": "torch",
        "shape": list(k.shape),
        "first_s": first,
        "second_s": second,
        "first_cpu_s": first_cpu,
        "second_cpu_s": second_cpu,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_mib": _rss_mib(),
        "params": n_params,
        "torch": torch.__version__,
        "threads": args.threads,
    }


def compare(args) -> None:
    """Both sides of the all-weights comparison, one process each, then the table."""
    torch_py = torch_python.resolve(args.torch_python, "torch, transformers")  # before jax
    import numpy as np

    from lora_jax import models

    with tempfile.TemporaryDirectory() as tmp:
        output_fn, params, train, _ = load(args.n, 1, args.max_length)
        del output_fn, params
        batch_file = Path(tmp) / "batch.npz"
        from lora_jax import tasks

        tokenizer = models.load_tokenizer(models.minilm_path())
        words = np.asarray(tasks.label_word_ids(tokenizer, tasks.get_task("mr")))
        np.savez(
            batch_file,
            label_word_ids=words,
            **{k: train[k] for k in ("input_ids", "attention_mask", "mask_pos")},
        )
        common = ["--n", str(args.n), "--max-length", str(args.max_length)]
        print(
            f"all-weights eNTK, MiniLM-L6 (tied readout, K={len(words)}, "
            f"T={args.max_length}), {args.n} x {args.n} train kernel",
            flush=True,
        )
        block = str(args.block or args.n)
        ours = _spawn(["--ours-worker", *common, "--batch", block, "--save", f"{tmp}/ours.npy"])
        others = [  # the other optimizer kernels on the same rows, one process each
            _spawn(["--ours-worker", *common, "--batch", block, "--kernel", kernel])
            for kernel in args.kernels
            if kernel != "sgd"
        ]
        theirs = _spawn(
            [
                "--torch-worker",
                *common,
                "--batch-file",
                str(batch_file),
                "--minilm-path",
                models.minilm_path(),
                "--threads",
                str(args.threads),
                "--torch-chunk",
                str(args.torch_chunk),
                "--save",
                f"{tmp}/torch.npy",
            ],
            python=torch_py,
        )
        rows = [r for r in (ours, theirs, *others) if r]
        if ours and theirs:
            a, b = np.load(f"{tmp}/ours.npy"), np.load(f"{tmp}/torch.npy")
            print(
                f"  kernels agree to {np.abs(a - b).max() / np.abs(b).max():.1e} (max abs "
                "difference / max abs entry)"
            )
        print(
            "| implementation | first call s | second call s | first / second call CPU s "
            "| peak RSS MiB |"
        )
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['side']} | {r['first_s']:.1f} | {r['second_s']:.1f} | "
                f"{r['first_cpu_s']:.1f} / {r['second_cpu_s']:.1f} | {r['peak_rss_mib']:.0f} |"
            )
        if ours and theirs:
            print(
                f"lora_jax vs torch: {theirs['first_s'] / ours['first_s']:.2f}x faster on the "
                f"first call, {theirs['second_s'] / ours['second_s']:.2f}x on the second; "
                f"load average {os.getloadavg()[0]:.1f}"
            )
        for r in others:
            if ours and r:
                print(
                    f"{r['side']} vs lora_jax (sgd): {r['first_s'] / ours['first_s']:.2f}x the "
                    f"time on the first call, {r['second_s'] / ours['second_s']:.2f}x on the "
                    "second"
                )
        if args.big:
            print(
                f"\n1000 test x {args.n} train all-weights kernel, batch_size={args.big_block}:",
                flush=True,
            )
            r = _spawn(["--ours-worker", *common, "--test-rows", "1000", "--batch", args.big_block])
            if r:
                print(
                    f"  shape {r['shape']}, {r['first_s']:.1f} s, peak RSS "
                    f"{r['peak_rss_mib']:.0f} MiB (after load {r['rss_loaded_mib']:.0f} MiB)"
                )
                rows.append(r)
    print("\nJSON:", json.dumps(rows))


def _spawn(extra: list[str], python: str | None = None) -> dict | None:
    extra = [str(e) for e in extra]
    cmd = [python or sys.executable, __file__, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  failed ({' '.join(extra)}): {' | '.join(tail)}", flush=True)
        return None
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="kernel block: n x n examples")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS[:3]), choices=SUBSETS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--skip-big", action="store_true", help="skip the 1000 x 64 kernel")
    parser.add_argument("--big-impl", default=None, help="default: fastest LoRA r=8 impl")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs; the fastest counts")
    parser.add_argument(
        "--big-batch", default="250,64", help="rows of test, rows of train per kernel block"
    )
    parser.add_argument("--compare", action="store_true", help="all weights vs PyTorch")
    parser.add_argument("--big", action="store_true", help="--compare: also 1000 x n")
    parser.add_argument(
        "--block", type=int, default=None, help="--compare: our batch_size (default: --n)"
    )
    parser.add_argument(
        "--big-block", default="64,64", help="--compare --big: test rows, train rows per block"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--torch-chunk", type=int, default=8, help="examples per torch vmap")
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["sgd"],
        choices=["sgd", "signgd", "asigngd"],
        help="--compare: our kernels (ntk.Kernel) to time; others than sgd against sgd",
    )
    parser.add_argument("--kernel", default="sgd", help=argparse.SUPPRESS)
    torch_python.add_argument(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", default="16", help=argparse.SUPPRESS)
    parser.add_argument("--test-rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--minilm-path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--big-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--subset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.big_worker:
        print(json.dumps(big(args)), flush=True)
        return
    if args.ours_worker:
        print(json.dumps(ours_all(args)), flush=True)
        return
    if args.torch_worker:
        print(json.dumps(torch_all(args)), flush=True)
        return
    if args.compare:
        compare(args)
        return

    import numpy as np

    results = []
    print(f"eNTK of MiniLM-L6 (tied readout, K=2, T={args.max_length}), {args.n}x{args.n} block")
    header = (
        f"{'subset':8} {'params':>10} {'implementation':29} {'compile s':>9} {'run s':>8} "
        f"{'peak MiB':>9} {'loaded MiB':>10} {'x run vs jacrev':>15}"
    )
    print(header)
    for subset in args.subsets:
        rows = []
        for impl in args.impls:
            r = _spawn(
                [
                    "--worker",
                    "--subset",
                    subset,
                    "--impl",
                    impl,
                    "--n",
                    str(args.n),
                    "--max-length",
                    str(args.max_length),
                    "--repeat",
                    str(args.repeat),
                ]
            )
            if r is not None:
                rows.append(r)
                results.append(r)
        base = next((r for r in rows if r["impl"] == "jacrev"), None)
        for r in rows:
            speed = f"{base['run_s'] / r['run_s']:.2f}" if base else "-"
            print(
                f"{r['subset']:8} {r['params']:>10,} {r['impl']:29} {r['compile_s']:>9.1f} "
                f"{r['run_s']:>8.2f} {r['peak_rss_mib']:>9.0f} {r['rss_loaded_mib']:>10.0f} "
                f"{speed:>15}",
                flush=True,
            )
        if base:
            for r in rows:
                a, b = np.asarray(r["kernel_00"]), np.asarray(base["kernel_00"])
                if np.abs(a - b).max() > 1e-3 * np.abs(b).max():
                    print(f"  WARNING: {r['impl']} disagrees with jacrev: {a} vs {b}")
    if not args.skip_big:
        lora8 = [r for r in results if r["subset"] == "lora_r8" and r["impl"] != "jacrev"]
        impl = args.big_impl or (
            min(lora8, key=lambda r: r["run_s"])["impl"] if lora8 else "JACOBIAN_CONTRACTION"
        )
        print(
            f"\n1000 test x 64 train kernel, LoRA r=8 (q, v), {impl}, batch_size={args.big_batch}:",
            flush=True,
        )
        r = _spawn(
            [
                "--big-worker",
                "--big-impl",
                impl,
                "--big-batch",
                str(args.big_batch),
                "--max-length",
                str(args.max_length),
            ]
        )
        if r is not None:
            print(
                f"  shape {r['shape']}, {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} "
                f"MiB (after load {r['rss_loaded_mib']:.0f} MiB), {r['devices']}"
            )
            results.append(r)
    print("\nJSON:", json.dumps(results))


if __name__ == "__main__":
    main()
