"""Several processes, one run: ``jax.distributed`` start-up and the helpers the loop needs.

Every process runs the same program on the same arguments (SPMD); arrays on a mesh that spans
all processes' devices are global, each process holding the shards of its own devices. Only
process 0 writes results (:func:`is_primary`); orbax checkpoints are written and restored by all
processes together.

Example (two processes on one machine, CPU collectives over gloo)::

  python -m experiments.run --coordinator 127.0.0.1:8476 --num-processes 2 --process-id 0 &
  python -m experiments.run --coordinator 127.0.0.1:8476 --num-processes 2 --process-id 1
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lora_jax.errors import ConfigError

PyTree = Any


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Starts ``jax.distributed`` when asked to; returns whether it did.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordination service.
      num_processes: number of processes; with ``coordinator``.
      process_id: this process's index in ``[0, num_processes)``; with ``coordinator``.
      auto: call ``jax.distributed.initialize()`` without arguments (TPU pods, SLURM, Open MPI
        fill them in from the environment).

    Raises:
      ValueError: an incomplete or inconsistent set of arguments (one line naming the flag).
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if auto:
        if any(v is not None for v in given.values()):
            raise ConfigError(
                "--distributed reads the processes from the environment; do not combine it with "
                "--coordinator / --num-processes / --process-id."
            )
        jax.distributed.initialize()
        return True
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ConfigError(
            f"Multi-process runs need --coordinator, --num-processes and --process-id; missing "
            f"{flags}."
        )
    if ":" not in coordinator:
        raise ConfigError(f"--coordinator {coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:8476.")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process-id {process_id} is out of range for --num-processes {num_processes}; "
            f"use 0..{num_processes - 1}."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes results, reports and plots."""
    return jax.process_index() == 0


def to_host(tree: PyTree) -> PyTree:
    """numpy copies of every leaf, gathered from all processes where an array spans several.

    Collective when some leaf is not fully addressable: every process must call it.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
