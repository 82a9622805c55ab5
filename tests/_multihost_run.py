"""Subprocess body of tests/test_distributed.py: one process of a short multi-process LoRA run.

``python tests/_multihost_run.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR STEPS [interleaved]``: with
NUM_PROCESSES > 1 it joins ``jax.distributed`` on 127.0.0.1:PORT. Trains the tiny encoder of
``_mesh_runs.py`` with LoRA on a mesh over every process's devices (data parallel), with orbax
checkpoints in OUT_DIR/ckpt (so a second call with more STEPS resumes), metrics in
OUT_DIR/metrics_<process>.jsonl (only process 0 writes), and, on process 0, the adapters in PEFT
format under OUT_DIR/peft plus OUT_DIR/result.json (losses, dev logits, and the A-SignGD
kernel of the trained adapters computed on the mesh and on process 0's first device alone).
``interleaved`` orders the mesh's devices process 0, 1, 0, 1, ... (as ``jax.make_mesh`` does
on TPU slices), so no process owns a contiguous block of the batch's rows.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _mesh_runs import tiny_problem  # noqa: E402

import ntk  # noqa: E402
from lora_jax import distributed, lora, programs, train  # noqa: E402
from lora_jax import sharding as sh  # noqa: E402
from lora_jax.trainable import make_model_fn, split_params  # noqa: E402


def main():
    pid, nproc, port, out, steps, *order = sys.argv[1:]
    pid, nproc, steps = int(pid), int(nproc), int(steps)
    if nproc > 1:
        distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    output_fn, params, data = tiny_problem()
    lcfg = lora.LoraConfig(r=2, alpha=4, targets="query|value")
    adapters, frozen = split_params(params, "lora", key=jax.random.key(0), lora_config=lcfg)
    model_fn = make_model_fn(output_fn, "lora", lora_config=lcfg)
    cfg = train.TrainConfig(steps=steps, batch_size=8, learning_rate=1e-2, eval_every=2)
    state = train.init_state(adapters, train.make_optimizer(cfg), cfg.seed)
    devices = jax.devices()
    if order == ["interleaved"]:  # local device j of every process, then j + 1, ...
        by_process = [[d for d in devices if d.process_index == p] for p in range(nproc)]
        devices = [group[j] for j in range(len(by_process[0])) for group in by_process]
    mesh = sh.make_mesh(f"data={jax.device_count()}", devices)
    owners = [d.process_index for d in mesh.devices.flat]
    assert order != ["interleaved"] or owners[:2] == [0, 1], owners
    result = train.fit(
        model_fn,
        state,
        frozen,
        data,
        data,
        cfg,
        progress=False,
        mesh=mesh,
        checkpoint_dir=os.path.join(out, "ckpt"),
        metrics_path=os.path.join(out, f"metrics_{pid}.jsonl"),
    )
    trained = distributed.to_host(result.state.trainable)  # collective: every process gathers
    # The A-SignGD kernel of the trained adapters with rows over the same (multi-process) mesh:
    # every process calls it with the same inputs and gets the whole kernel. 16 x 12 rows in
    # blocks of (8, 4) on 4 devices: kept Jacobians, several blocks of each side.
    assert distributed.smallest(2**40 + 7 * pid) == 2**40  # over 32 bits, agreed
    f, sub, info = ntk.lora_kernel_model(output_fn, params, trained, lcfg)
    x1, x2 = data, {k: v[:12] for k, v in data.items()}
    kernel_options = dict(kernel="asigngd", batch_size=(8, 4), model_info=info, vmap_axes=0)
    sharded = ntk.empirical_ntk_fn(f, mesh=mesh, **kernel_options)(x1, x2, sub)
    if distributed.is_primary():
        single = ntk.empirical_ntk_fn(f, **kernel_options)(x1, x2, sub)  # this process alone
        lora.save_peft(os.path.join(out, "peft"), trained, lcfg)
        logits = programs.make_predict(model_fn, 16)(trained, frozen, data)
        record = {
            "losses": [r["train_loss"] for r in result.history],
            "dev_loss": [r["dev_loss"] for r in result.history],
            "logits": np.asarray(logits).tolist(),
            "devices": jax.device_count(),
            "owners": owners,
            "kernel_mesh": sharded.tolist(),
            "kernel_one_device": single.tolist(),
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(record, f)
    distributed.barrier("done")


if __name__ == "__main__":
    main()
