"""CPU forward benchmark: lora_jax (jitted) vs Hugging Face PyTorch, same model and batch.

Each side runs in its own interpreter, since torch is not a project dependency:

    uv run python benchmarks/bench_forward.py --compare --torch-python PATH   # both + ratio
    uv run python benchmarks/bench_forward.py --impl jax --path DIR
    /path/to/torch-venv/bin/python benchmarks/bench_forward.py --impl torch --path DIR

``--compare`` prepares the model directory (the embedded MiniLM-L6, or a random model of
RoBERTa-base or DeBERTa-v3-base shape written by ``lora_jax.models.save_pretrained``), then runs
both sides with the
same thread count, batch and padding, and prints ms/iter (median after warm-up) and the ratio.
The torch interpreter comes from ``--torch-python`` (default: ``$LORA_JAX_TORCH_PYTHON``;
see ``benchmarks/torch_python.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch_python  # benchmarks/torch_python.py, next to this script


def make_batch(vocab: int, batch: int, seq: int, pad_id: int, seed: int = 0):
    """Random ids with padding in the batch: lengths spread over [seq/2, seq]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.linspace(seq // 2, seq, batch).astype(int)
    ids = np.full((batch, seq), pad_id, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(5, vocab, n)
        mask[b, :n] = 1
    return ids, mask


def _config(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _timeit(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_jax(path: str, batch: int, seq: int, warmup: int, iters: int, dtype: str) -> dict:
    import jax

    from lora_jax import models

    model = models.from_pretrained(path, head=None, dtype=dtype)
    apply_fn, params = models.split(model)
    cfg = model.config
    ids, mask = make_batch(cfg.vocab_size, batch, seq, cfg.pad_token_id)
    ids, mask = jax.device_put(ids.astype("int32")), jax.device_put(mask.astype("int32"))
    fwd = jax.jit(apply_fn)
    t0 = time.perf_counter()
    fwd(params, ids, mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = _timeit(lambda: fwd(params, ids, mask).block_until_ready(), warmup, iters)
    return {"impl": "jax", "compile_s": compile_s, "times_ms": times, "jax": jax.__version__}


def bench_torch(path: str, batch: int, seq: int, warmup: int, iters: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    cfg = _config(path)
    cls = {
        "roberta": transformers.RobertaModel,
        "bert": transformers.BertModel,
        "deberta-v2": transformers.DebertaV2Model,
    }[cfg["model_type"]]
    model = cls.from_pretrained(path).eval()
    ids, mask = make_batch(cfg["vocab_size"], batch, seq, cfg["pad_token_id"])
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    times = _timeit(run, warmup, iters)
    return {
        "impl": "torch",
        "times_ms": times,
        "torch": torch.__version__,
        "attn": model.config._attn_implementation,
    }


DEBERTA_V3_BASE = {
    "model_type": "deberta-v2",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 128100,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
    "relative_attention": True,
    "max_relative_positions": -1,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": "p2c|c2p",
    "position_biased_input": False,
    "pad_token_id": 0,
}


def _prepare(model: str, tmp: str) -> str:
    from lora_jax import models

    if model == "minilm":
        return str(models.minilm_path())
    config = models.EncoderConfig()  # RoBERTa-base shape: 12 layers, hidden 768, 12 heads
    if model == "deberta-v3-base":  # microsoft/deberta-v3-base's config.json, random weights
        config = models.EncoderConfig.from_hf(DEBERTA_V3_BASE)
    directory = Path(tmp) / f"{model}-random"
    models.save_pretrained(models.create(config, head=None, seed=0), directory)
    return str(directory)


def compare(args) -> None:
    torch_py = torch_python.resolve(args.torch_python, "torch, transformers")
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--iters", str(args.iters)]
    common += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--json"]
    with tempfile.TemporaryDirectory() as tmp:
        path = _prepare(args.model, tmp)
        results: dict[str, dict] = {}
        # Alternate the sides over several rounds, so that load on a shared machine hits both.
        for _ in range(args.rounds):
            for impl, python in (("jax", sys.executable), ("torch", torch_py)):
                cmd = [python, __file__, "--impl", impl, "--path", path, *common]
                out = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env=_env(args)
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                if impl in results:
                    results[impl]["times_ms"] += res["times_ms"]
                else:
                    results[impl] = res
    jax_ms = statistics.median(results["jax"]["times_ms"])
    torch_ms = statistics.median(results["torch"]["times_ms"])
    print(
        f"model={args.model} batch={args.batch} seq={args.seq} threads={args.threads} "
        f"float32, median of {args.rounds} rounds x {args.iters} iters after {args.warmup} warm-up"
    )
    compile_s = results["jax"]["compile_s"]
    print(f"  jax   (jit)        {jax_ms:8.1f} ms/iter  (compile {compile_s:.1f} s)")
    print(f"  torch (inference)  {torch_ms:8.1f} ms/iter  (attn={results['torch']['attn']})")
    print(f"  torch / jax = {torch_ms / jax_ms:.2f}x  (> 1 means lora_jax is faster)")


def _env(args) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=["jax", "torch"])
    parser.add_argument("--compare", action="store_true", help="run both sides, print the ratio")
    parser.add_argument(
        "--model", choices=["minilm", "roberta-base", "deberta-v3-base"], default="minilm"
    )
    parser.add_argument("--path", help="HF model directory (for --impl)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side")
    parser.add_argument("--dtype", default="float32")
    torch_python.add_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --compare)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > args.threads:
        # Both sides get the same cores: XLA sizes its thread pool from the affinity mask.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.compare:
        compare(args)
        return
    if args.impl is None:
        parser.error("pass --compare, or --impl jax|torch with --path")
    if args.path is None:
        if args.impl == "torch":
            parser.error("--impl torch needs --path (the torch venv has no lora_jax)")
        args.path = _prepare(args.model, tempfile.mkdtemp())
    if args.impl == "jax":
        res = bench_jax(args.path, args.batch, args.seq, args.warmup, args.iters, args.dtype)
    else:
        res = bench_torch(args.path, args.batch, args.seq, args.warmup, args.iters, args.threads)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['impl']}: {statistics.median(res['times_ms']):.1f} ms/iter (median)")


if __name__ == "__main__":
    main()
