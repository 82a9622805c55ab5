"""Training chunks of the linearized LoRA model (``ntk.lora_linearized_model_fn``, what
``experiments.run --ntk`` trains): the tangent as a JVP over the dense kernels
(``fusion='merged'``) against the same tangent through the LoRA factors (``fusion='fused'``),
in one process, timed windows interleaved.

  uv run python benchmarks/bench_linearized.py --steps 50 --reps 3

Model: RoBERTa-shaped random weights (``--layers``, ``--hidden``, 4 heads, intermediate
4 x hidden, vocab 1000), classification head; LoRA r=8, alpha=16 on query/value; float32; batch
``--batch`` x sequence ``--seq``; AdamW, ``programs.make_train_chunk`` (one compiled chunk of
``--steps`` steps per variant). Prints seconds per chunk (best and median of ``--reps``) and the
outputs' largest difference between the two after one chunk.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import ntk
    from lora_jax import lora, models, programs, train
    from lora_jax.readout import make_output_fn

    config = models.EncoderConfig(
        model_type="roberta", vocab_size=1000, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq + 2, type_vocab_size=1, pad_token_id=1,
    )  # fmt: skip
    apply_fn, params = models.split(models.create(config, head="cls", num_labels=2, seed=0))
    output_fn = make_output_fn(apply_fn, "cls")
    lcfg = lora.LoraConfig(r=8, alpha=16, targets="query|value")
    rng = np.random.default_rng(0)
    n = 4 * args.batch
    data = {
        "input_ids": rng.integers(3, 1000, size=(n, args.seq)).astype(np.int32),
        "attention_mask": np.ones((n, args.seq), np.int32),
        "labels": (np.arange(n) % 2).astype(np.int32),
    }
    tcfg = train.TrainConfig(
        steps=args.steps, batch_size=args.batch, learning_rate=1e-3, eval_every=args.steps
    )
    optimizer = train.make_optimizer(tcfg)
    adapters0 = lora.init(jax.random.key(1), params, lcfg)

    def fresh():  # the chunk donates its state: a copy of the initial adapters each time
        return train.init_state(jax.tree.map(jnp.copy, adapters0), optimizer, 0)

    chunks, finals = {}, {}
    for fusion in ("merged", "fused"):
        lin_fn = ntk.lora_linearized_model_fn(output_fn, lcfg, fusion=fusion)
        chunk = programs.make_train_chunk(lin_fn, optimizer, tcfg)
        t = time.perf_counter()
        state, losses = chunk(fresh(), params, data)
        jax.block_until_ready(losses)
        print(f"{fusion}: compile + first chunk {time.perf_counter() - t:.1f} s")
        chunks[fusion] = (lin_fn, chunk)
        finals[fusion] = np.asarray(lin_fn(state.trainable, params, data))
    diff = np.max(np.abs(finals["merged"] - finals["fused"]))
    print(f"outputs after one chunk: max |merged - fused| = {diff:.2e}")
    times = {f: [] for f in chunks}
    for _ in range(args.reps):
        for fusion, (_, chunk) in chunks.items():
            state = fresh()
            t = time.perf_counter()
            jax.block_until_ready(chunk(state, params, data)[1])
            times[fusion].append(time.perf_counter() - t)
    for fusion, ts in times.items():
        print(
            f"{fusion}: {args.steps} steps best {min(ts):.2f} s, median {np.median(ts):.2f} s "
            f"({args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq})"
        )


if __name__ == "__main__":
    main()
