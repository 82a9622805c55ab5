"""Subprocess body of tests/test_ntk_experiment_mesh.py: ``experiments.run`` runs on 8 simulated
devices.

``python tests/_ntk_experiment_mesh_run.py ARGS [--- ARGS ...]`` runs ``experiments.run`` with
each argument list in turn (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set by the
test before jax starts) and prints one JSON object per run, one a line: the device counts of
the kernel programs it compiled (``ntk._programs``), and the meshes (axis sizes, or None) the
linearized model's training (``lora_jax.train.fit``) was given.
"""

import json
import sys

import jax

from experiments import run
from lora_jax import train
from ntk import _programs

fit = train.fit
meshes = []


def watched_fit(*args, mesh=None, **kwargs):  # what the NTK analysis trains on
    meshes.append(None if mesh is None else dict(mesh.shape))
    return fit(*args, mesh=mesh, **kwargs)


def main():
    assert jax.device_count() == 8, jax.devices()
    train.fit = watched_fit
    argv, runs = sys.argv[1:], []
    while argv:
        args = argv[: argv.index("---")] if "---" in argv else argv
        argv = argv[len(args) + 1 :]
        _programs._PROGRAMS.clear()
        meshes.clear()
        run.main(args)
        devices = {
            len(sharding.device_set)
            for _, exe in _programs._PROGRAMS.values()
            for sharding in jax.tree.leaves(exe.input_shardings)
        }
        runs.append({"kernel_devices": sorted(devices), "linearized_meshes": list(meshes)})
    for one in runs:
        print(json.dumps(one))


if __name__ == "__main__":
    main()
