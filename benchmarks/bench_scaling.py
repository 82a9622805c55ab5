"""LoRA training throughput vs number of devices on a mesh, and MFU from an exact FLOP count.

  uv run python benchmarks/bench_scaling.py                          # 1, 2, 4, 8 CPU devices
  uv run python benchmarks/bench_scaling.py --devices 1 8 --hidden 256 --layers 4
  python benchmarks/bench_scaling.py --devices 1 2 4 8 --peak-tflops 989   # 8 x H100 (bf16)

One subprocess per device count n with a ``data=n`` mesh (data parallel, replicated base and
adapters), training LoRA (query/value, fused: ``x W + s (x A) B``) on a random RoBERTa-shaped
encoder with a fixed batch per device (weak scaling). It prints steps/s and tokens/s per device
count. On CPU each subprocess simulates n devices (``--xla_force_host_platform_device_count=n``
appended to the caller's ``XLA_FLAGS``); they share the same cores, so this checks that the
sharded program runs and how its overhead grows, not speed. On a GPU node or TPU host
(``jax.default_backend()`` is not ``cpu``) the mesh takes the first n real devices and the
flags are left alone, so the same command measures scaling. The model computes in
``--dtype``: bfloat16 on accelerators (whose peaks, ``--peak-tflops``, are bf16 peaks), float32
on CPU.

FLOPs per step (forward + backward, the optimizer update is elementwise and left out):
frozen weights need no weight-gradient GEMM, so each token costs 2 N (forward) + 2 N (input
gradients) for the frozen GEMM weights N, and 6 n for the LoRA factors n (forward, input and
weight gradients), plus attention 12 L T H (QK^T and AV, forward and backward, bidirectional).
The count here is exact for this program: layer 0's input gradient is not needed (the
embeddings are frozen), so its q/k/v input-gradient GEMMs and the LoRA ``dy B^T A^T`` of layer 0
are left out, and the tied-mean readout adds 2 H K per example. It is checked against XLA's
``compiled.cost_analysis()['flops']`` of one step on one device (which also counts the
elementwise work: softmax, GELU, LayerNorm, Adam). MFU divides the achieved model FLOP/s by a
peak: ``--peak-tflops`` (e.g. 989 for an H100 in bf16) or, by default on CPU, the FLOP/s of a
large matmul measured in the same process (so CPU "MFU" is relative to the machine's own GEMM
speed). The usual 6 (N + n) per token is printed beside it: it overstates LoRA work by ~1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def lora_step_flops(*, L: int, H: int, I: int, T: int, B: int, r: int, K: int) -> dict:
    """FLOPs of one fused LoRA (query, value) training step, by GEMM (see module docstring)."""
    frozen = L * (4 * H * H + 2 * H * I)  # q, k, v, o, FFN in/out weights per layer
    lora = L * 2 * (2 * H * r)  # A (H, r) and B (r, H) for query and value
    tokens = B * T
    exact = tokens * (4 * frozen + 6 * lora + 12 * L * T * H)
    exact -= tokens * (2 * 3 * H * H + 2 * 2 * H * r)  # layer 0: no input gradient
    exact += B * 2 * H * K * 3  # readout (forward, backward) against K label words
    return {
        "exact": exact,
        "lora_formula": tokens * (4 * frozen + 6 * lora + 12 * L * T * H),
        "six_n": tokens * 6 * (frozen + lora),
        "frozen_params": frozen,
        "lora_params": lora,
    }


def worker(a) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import lora, models, programs, train
    from lora_jax import sharding as sh
    from lora_jax.losses import get_loss
    from lora_jax.readout import make_output_fn
    from lora_jax.trainable import make_model_fn

    n = a.use_devices or jax.device_count()
    devices = jax.devices()[:n]
    config = models.EncoderConfig(
        model_type="roberta",
        vocab_size=1000,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=max(a.hidden // 64, 1),
        intermediate_size=4 * a.hidden,
        max_position_embeddings=a.seq + 2,
        type_vocab_size=1,
        pad_token_id=1,
    )
    apply_fn, params = models.split(models.create(config, head=None, dtype=a.dtype))
    output_fn = make_output_fn(apply_fn, "tied_mean", np.array([5, 6], np.int32))
    lcfg = lora.LoraConfig(r=a.rank, alpha=2 * a.rank, targets="query|value")
    adapters = lora.init(jax.random.key(0), params, lcfg)
    model_fn = make_model_fn(output_fn, "lora", lora_config=lcfg, fusion="fused")
    batch = a.batch_per_device * n
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(3, 1000, size=(batch * 2, a.seq)).astype(np.int32),
        "attention_mask": np.ones((batch * 2, a.seq), np.int32),
        "labels": (np.arange(batch * 2) % 2).astype(np.int32),
    }
    cfg = train.TrainConfig(steps=a.steps, batch_size=batch, eval_every=a.steps, max_grad_norm=None)
    opt = train.make_optimizer(cfg)
    mesh = sh.make_mesh(f"data={n}", devices=devices)
    rules = sh.rules_for_mesh(mesh)
    chunk = programs.make_train_chunk(model_fn, opt, cfg, mesh=mesh, rules=rules)
    state = train.init_state(adapters, opt, 0)
    state = sh.place(state, sh.tree_shardings(state, mesh, rules))
    frozen = sh.place(params, sh.tree_shardings(params, mesh, rules))
    placed = sh.place_data(data, mesh, rules)
    state, losses = chunk(state, frozen, placed)  # compile + warm-up
    losses.block_until_ready()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        state, losses = chunk(state, frozen, placed)
        losses.block_until_ready()
        times.append(time.perf_counter() - t0)
    best = min(times)
    out = {"devices": n, "batch": batch, "steps_per_s": a.steps / best}
    out["platform"], out["dtype"] = devices[0].platform, a.dtype
    out["tokens_per_s"] = out["steps_per_s"] * batch * a.seq
    flops = lora_step_flops(L=a.layers, H=a.hidden, I=4 * a.hidden, T=a.seq, B=batch, r=a.rank, K=2)
    out.update(flops)
    if n == 1:
        # XLA's count for one step (no scan) on one device.
        loss_fn = get_loss(cfg.loss)

        def step(trainable, frozen, batch):
            def objective(t):
                return loss_fn(model_fn(t, frozen, batch, None), batch["labels"])

            loss, grads = jax.value_and_grad(objective)(trainable)
            updates, _ = opt.update(grads, opt.init(trainable), trainable)
            return loss, updates

        one = {k: v[:batch] for k, v in data.items()}
        compiled = jax.jit(step).lower(adapters, params, one).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out["xla_flops"] = float(cost["flops"])
    if a.peak_tflops:
        out["peak_flops"] = a.peak_tflops * 1e12
    else:
        m = 2048
        x = jnp.ones((m, m), jnp.float32)
        mm = jax.jit(lambda x: x @ x)
        mm(x).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(3):
            y = mm(x)
        y.block_until_ready()
        out["peak_flops"] = 3 * 2 * m**3 / (time.perf_counter() - t0)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-per-device", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window (one scan)")
    p.add_argument("--reps", type=int, default=3, help="timed windows; the best is reported")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: CPU)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: bfloat16 on an accelerator, float32 on CPU)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--use-devices", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    backend = _backend()
    dtype = a.dtype or ("float32" if backend == "cpu" else "bfloat16")
    if a.peak_tflops and dtype != "bfloat16":
        print(f"note: MFU against --peak-tflops {a.peak_tflops} assumes a {dtype} peak.")
    rows = []
    for n in a.devices:
        env = dict(os.environ)
        extra = ["--dtype", dtype]
        if backend == "cpu":  # simulated devices, added to (not replacing) the caller's flags
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        else:  # real devices: the first n of them
            extra += ["--use-devices", str(n)]
        argv = [sys.executable, __file__, "--worker", *_without_devices(sys.argv[1:]), *extra]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"worker with {n} devices failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"LoRA r={a.rank} query/value, fused, {dtype} on {backend}; L={a.layers} H={a.hidden} "
        f"T={a.seq}, {a.batch_per_device} sequences per device, data-parallel mesh"
    )
    # One peak for every row: the best of the workers' matmul measurements (or --peak-tflops).
    peak = max(r["peak_flops"] for r in rows)
    print("| devices | batch | steps/s | tokens/s | model GFLOP/step | MFU | MFU (6N) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu, mfu_6n = (r[k] * r["steps_per_s"] / peak for k in ("exact", "six_n"))
        print(
            f"| {r['devices']} | {r['batch']} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {r['exact'] / 1e9:.3f} | {mfu:.1%} | {mfu_6n:.1%} |"
        )
    for r in rows:
        if "xla_flops" in r:
            print(
                f"FLOPs of one step on 1 device: exact GEMM count {r['exact']:,}, XLA "
                f"cost_analysis {r['xla_flops']:,.0f} (ratio {r['xla_flops'] / r['exact']:.3f}); "
                f"4N+6n+attention formula {r['lora_formula']:,}, 6(N+n) {r['six_n']:,} "
                f"({r['six_n'] / r['exact']:.2f}x the exact count)"
            )
    print(f"peak used for MFU: {peak / 1e9:,.1f} GFLOP/s")


def _backend() -> str:
    """``jax.default_backend()`` of a fresh process (this one never starts jax itself)."""
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return "cpu"
    code = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _without_devices(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if arg in ("--devices", "--dtype"):
            skip = True
            continue
        if skip and not arg.startswith("--"):
            continue
        skip = False
        out.append(arg)
    return out


if __name__ == "__main__":
    main()
