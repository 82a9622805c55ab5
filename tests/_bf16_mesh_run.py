"""Subprocess body of tests/test_bf16_mesh.py: LoRA training of a tiny encoder in float32 on one
device and in bfloat16 on a data=8 mesh (8 simulated CPU devices).

Run as ``python tests/_bf16_mesh_run.py`` with 8 simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``);
prints one JSON object: per run, the training losses, the dev logits and the trained factors.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora, models, programs, train
from lora_jax import sharding as sh
from lora_jax.readout import make_output_fn
from lora_jax.trainable import Method, make_model_fn


def run(dtype: str, mesh_spec: str | None) -> dict:
    config = models.EncoderConfig(
        model_type="roberta", vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
        type_vocab_size=1, pad_token_id=1,
    )  # fmt: skip
    apply_fn, params = models.split(models.create(config, head="mlm", seed=0, dtype=dtype))
    output_fn = make_output_fn(apply_fn, "mlm", np.array([7, 9], np.int32))
    lcfg = lora.LoraConfig(r=4, alpha=8, targets="query|value")
    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=lcfg, fusion="fused")
    adapters = lora.init(jax.random.key(0), params, lcfg)
    rng = np.random.default_rng(0)
    n, t = 32, 12
    data = {
        "input_ids": rng.integers(3, 64, size=(n, t)).astype(np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "mask_pos": rng.integers(1, t, size=n).astype(np.int32),
        "labels": (np.arange(n) % 2).astype(np.int32),
    }
    cfg = train.TrainConfig(steps=20, batch_size=16, learning_rate=3e-2, eval_every=10)
    state = train.init_state(adapters, train.make_optimizer(cfg), cfg.seed)
    mesh = None if mesh_spec is None else sh.make_mesh(mesh_spec)
    result = train.fit(model_fn, state, params, data, data, cfg, progress=False, mesh=mesh)
    logits = programs.make_predict(model_fn, 32)(
        jax.tree.map(np.asarray, result.state.trainable), params, data
    )
    return {
        "losses": [r["train_loss"] for r in result.history],
        "logits": np.asarray(logits, np.float32).tolist(),
        "lora_b": np.concatenate(
            [np.ravel(np.asarray(v["lora_b"])) for v in result.state.trainable.values()]
        ).tolist(),
        "dtype": str(jnp.asarray(logits).dtype),
    }


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    json.dump({"f32": run("float32", None), "bf16_mesh": run("bfloat16", "data=8")}, sys.stdout)
