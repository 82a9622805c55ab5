"""Subprocess body of tests/test_sweep.py's mesh test: a job of 16 members on a data=8 mesh of
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``; two members per
device) and its first 5 on data=4 (padded to 8 with idle members) vs one device. Prints one JSON
object."""

import json
import re

import jax
import numpy as np
from _mesh_runs import tiny_config  # the script's directory is on sys.path

from lora_jax import lora, models, programs, train
from lora_jax import sharding as sh
from lora_jax.readout import make_output_fn
from lora_jax.trainable import Method, make_model_fn

_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, int]]:
    """``(op, bytes of its result)`` of every collective instruction of an HLO module's text."""
    found = []
    for shapes, op in _COLLECTIVE.findall(hlo):
        size = 0
        for dtype, dims in _SHAPE.findall(shapes):
            bits = 8 if dtype == "pred" else int(re.sub(r"[a-z]+", "", dtype))
            size += int(np.prod([int(d) for d in dims.split(",") if d])) * bits // 8
        found.append((op, size))
    return found


def main():
    config = tiny_config()
    apply_fn, params = models.split(models.create(config, head="cls", num_labels=2, seed=0))
    output_fn = make_output_fn(apply_fn, "cls")
    datas = []
    n = 16
    for i in range(n):
        rng = np.random.default_rng(i)
        datas.append(
            {
                "input_ids": rng.integers(5, 50, (12, 8)).astype(np.int32),
                "attention_mask": np.ones((12, 8), np.int32),
                "labels": rng.integers(0, 2, 12).astype(np.int32),
            }
        )
    configs = [
        lora.LoraConfig(r=1 + i % 2, alpha=2.0 + 2 * (i % 2), targets="query|value")
        for i in range(n)
    ]
    plan = lora.plan_stack(params, configs)
    tcfg = train.TrainConfig(steps=4, eval_every=2, batch_size=4, eval_batch_size=12)
    seeds = list(range(n))
    fn = lora.with_member_factors(
        make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    )

    def fresh():
        return train.init_states(lora.init_stack(params, plan, seeds), tcfg, [3e-2] * n, seeds)

    def first(tree, k):
        return jax.tree.map(lambda x: x[:k], tree)

    mesh = sh.make_mesh("data=8", jax.devices()[:8])
    four = sh.make_mesh("data=4", jax.devices()[:4])
    out = {}
    for name, m, k in (("one", None, n), ("mesh", mesh, n), ("padded", four, 5)):
        res = train.fit_job(
            fn,
            first(fresh(), k),
            params,
            datas[:k],
            datas[:k],
            tcfg,
            member_inputs=first(plan.factors, k),
            test_data=datas[0],
            progress=False,
            mesh=m,
        )
        out[name] = {
            "losses": [[h["train_loss"] for h in r.history] for r in res],
            "best_step": [r.best_step for r in res],
            "test": [r.test["accuracy"] for r in res],
            "b": [
                np.asarray(next(iter(r.state.trainable.values()))["lora_b"]).tolist() for r in res
            ],
        }
        # Where the job's state lives after training on the mesh (default rule table).
        leaf = next(iter(res[0].state.trainable.values()))["lora_a"]
        out[name]["devices"] = len(leaf.sharding.device_set)
    # The members split over the data axis inside the loop: a chunk's output state.
    compiled = programs.job_programs(fn, tcfg, member_inputs=True, mesh=mesh)
    table = sh.rules_for_mesh(mesh)
    state = sh.place(fresh(), sh.tree_shardings(fresh(), mesh, table))
    frozen = (sh.place(params, sh.tree_shardings(params, mesh, table)), plan.factors)
    data = jax.device_put(
        jax.tree.map(lambda *xs: np.stack(xs), *datas),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
    )
    # The collectives of the member-split chunk, from its compiled HLO: (op, result bytes).
    hlo = compiled.chunk.lower(state, frozen, data, 2, shared=False).compile().as_text()
    out["collectives"] = collectives(hlo)
    state, _ = compiled.chunk(state, frozen, data, 2, shared=False)
    leaf = next(iter(state.trainable.values()))["lora_a"]
    out["spec"] = str(leaf.sharding.spec)
    out["chunk_devices"] = len(leaf.sharding.device_set)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
