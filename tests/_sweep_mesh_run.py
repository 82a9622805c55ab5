"""Subprocess body of tests/test_sweep.py's mesh test: 4 sweep members on a data=4 mesh of
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) vs one device.
Prints one JSON object."""

import json

import jax
import numpy as np
from _mesh_runs import tiny_config  # the script's directory is on sys.path

from lora_jax import lora, models, sweep, train
from lora_jax import sharding as sh
from lora_jax.readout import make_output_fn
from lora_jax.trainable import Method, make_model_fn


def main():
    config = tiny_config()
    apply_fn, params = models.split(models.create(config, head="cls", num_labels=2, seed=0))
    output_fn = make_output_fn(apply_fn, "cls")
    datas = []
    for i in range(4):
        rng = np.random.default_rng(i)
        datas.append(
            {
                "input_ids": rng.integers(5, 50, (12, 8)).astype(np.int32),
                "attention_mask": np.ones((12, 8), np.int32),
                "labels": rng.integers(0, 2, 12).astype(np.int32),
            }
        )
    configs = [lora.LoraConfig(r=r, alpha=2.0 * r, targets="query|value") for r in (1, 2, 1, 2)]
    plan = sweep.plan_lora(params, configs)
    tcfg = train.TrainConfig(steps=4, eval_every=2, batch_size=4, eval_batch_size=12)
    seeds = [0, 1, 2, 3]
    fn = sweep.lora_model_fn(
        make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fused=True)
    )

    def fresh():
        return sweep.init_states(sweep.init_lora(params, plan, seeds), tcfg, [3e-2] * 4, seeds)

    mesh = sh.make_mesh("data=4", jax.devices()[:4])
    out = {}
    for name, m in (("one", None), ("mesh", mesh)):
        res = sweep.fit(
            fn,
            fresh(),
            params,
            datas,
            datas,
            tcfg,
            member_inputs=plan.factors,
            progress=False,
            mesh=m,
        )
        out[name] = {
            "losses": [[h["train_loss"] for h in r.history] for r in res],
            "best_step": [r.best_step for r in res],
            "b": [
                np.asarray(next(iter(r.state.trainable.values()))["lora_b"]).tolist() for r in res
            ],
        }
    # Where the stacked state lives after a chunk on the mesh.
    table = sh.rules("adapter")
    state = sweep._along_members(fresh(), mesh, table)
    frozen = (
        jax.device_put(params, sh.replicated(mesh)),
        sweep._along_members(plan.factors, mesh, table),
    )
    data = sweep._along_members(sweep.stack(datas), mesh, table)
    chunk = sweep.programs(fn, tcfg, member_inputs=True, shared_data=False).chunk
    state, _ = chunk(state, frozen, data, 2)
    leaf = next(iter(state.trainable.values()))["lora_a"]
    out["spec"] = str(leaf.sharding.spec)
    out["devices"] = len(leaf.sharding.device_set)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
