"""Subprocess body of tests/test_sharding.py: short runs on 8 simulated CPU devices.

Run as ``python tests/_mesh_runs.py`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(set by the test before jax starts); prints one JSON object: per run, the training losses, the
final trainable leaves and the specs of the state's arrays.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from lora_jax import lora, models, programs, train
from lora_jax import sharding as sh
from lora_jax.readout import make_output_fn
from lora_jax.trainable import Method, make_model_fn, split_params

MESHES = (None, "data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2")


def tiny_config() -> models.EncoderConfig:
    """The 1-layer, hidden-16 RoBERTa of the subprocess tests (random weights, no tokenizer)."""
    return models.EncoderConfig(
        model_type="roberta",
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
    )


def tiny_problem(method=Method.LORA):
    config = tiny_config()
    if method == Method.HEAD:  # a classification head trained on the frozen encoder
        apply_fn, params = models.split(models.create(config, head="cls", num_labels=2, seed=0))
        output_fn = make_output_fn(apply_fn, "cls")
    else:
        apply_fn, params = models.split(models.create(config, head="mlm", seed=0))
        output_fn = make_output_fn(apply_fn, "mlm", np.array([7, 9], np.int32))
    rng = np.random.default_rng(0)
    n, t = 16, 8
    data = {
        "input_ids": rng.integers(3, 50, size=(n, t)).astype(np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "mask_pos": rng.integers(1, t, size=n).astype(np.int32),
        "labels": (np.arange(n) % 2).astype(np.int32),
    }
    return output_fn, params, data


def flat(tree):
    return {
        jax.tree_util.keystr(kp): np.asarray(x).tolist()
        for kp, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def specs(tree):
    """Each leaf's PartitionSpec, one entry per dimension (a trailing None is kept: specs that
    differ only in those are the same sharding)."""
    return {
        jax.tree_util.keystr(kp): str(
            tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        )
        for kp, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def run(method, mesh_spec, ntk=False):
    output_fn, params, data = tiny_problem(method)
    lcfg = lora.LoraConfig(r=2, alpha=4, targets="query|value|dense")
    trainable, frozen = split_params(params, method, key=jax.random.key(0), lora_config=lcfg)
    if ntk:
        from ntk.linearize import lora_linearized_model_fn

        model_fn = lora_linearized_model_fn(output_fn, lcfg)
    else:
        model_fn = make_model_fn(output_fn, method, lora_config=lcfg)
    cfg = train.TrainConfig(steps=2, batch_size=8, learning_rate=1e-2, eval_every=2)
    state = train.init_state(trainable, train.make_optimizer(cfg), cfg.seed)
    mesh = None if mesh_spec is None else sh.make_mesh(mesh_spec)
    result = train.fit(model_fn, state, frozen, data, data, cfg, progress=False, mesh=mesh)
    out = {
        "losses": [r["train_loss"] for r in result.history],
        "dev_loss": [r["dev_loss"] for r in result.history],
        "trainable": flat(result.state.trainable),
    }
    if mesh is not None:
        table = sh.rules_for_mesh(mesh)
        expected = sh.tree_shardings(result.state, mesh, table)
        out["state_specs"] = specs(result.state)
        out["state_matches_rules"] = all(
            a.sharding.is_equivalent_to(e, np.ndim(a))
            for a, e in zip(jax.tree.leaves(result.state), jax.tree.leaves(expected), strict=True)
        )
        placed = sh.place(frozen, sh.tree_shardings(frozen, mesh, table))
        out["frozen_specs"] = specs(placed)
        if method == Method.LORA and not ntk:
            # Sharded adapters -> PEFT files -> loaded on one device: the same logits.
            predict = programs.make_predict(model_fn, 16, mesh=mesh)
            out["mesh_logits"] = np.asarray(predict(result.state.trainable, placed, data)).tolist()
            # 13 rows, which no mesh here divides: the block is padded to a multiple of the
            # batch shards and split over them (not replicated), with one device's outputs.
            odd = {k: np.asarray(v)[:13] for k, v in data.items()}
            host = jax.tree.map(np.asarray, result.state.trainable)
            out["odd_mesh_logits"] = np.asarray(predict(host, placed, odd)).tolist()
            out["odd_logits"] = np.asarray(
                programs.make_predict(model_fn, 16)(host, frozen, odd)
            ).tolist()
            with tempfile.TemporaryDirectory() as d:
                lora.save_peft(d, result.state.trainable, lcfg)
                loaded, cfg_back = lora.load_peft(d)
            plain = make_model_fn(output_fn, method, lora_config=cfg_back)
            logits = programs.make_predict(plain, 16)(loaded, frozen, data)
            out["peft_logits"] = np.asarray(logits).tolist()
            out["peft_keys"] = sorted(f"{p}.{k}" for p, v in loaded.items() for k in v)
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    runs = {}
    for mesh_spec in MESHES:
        runs[f"lora/{mesh_spec}"] = run(Method.LORA, mesh_spec)
    for mesh_spec in (None, MESHES[-1]):
        runs[f"full/{mesh_spec}"] = run(Method.FULL, mesh_spec)
        runs[f"head/{mesh_spec}"] = run(Method.HEAD, mesh_spec)
        runs[f"ntk/{mesh_spec}"] = run(Method.LORA, mesh_spec, ntk=True)
    try:
        cfg = train.TrainConfig(steps=2, batch_size=6, eval_every=2)
        programs.make_train_chunk(None, None, cfg, mesh=sh.make_mesh("data=4,fsdp=2"))
    except ValueError as err:
        runs["batch_error"] = str(err)
    json.dump(runs, sys.stdout)


if __name__ == "__main__":
    main()
