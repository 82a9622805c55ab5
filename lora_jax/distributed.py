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

import os
import sys
import threading
import time
from collections.abc import Callable
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


# -- a run that loses a process -------------------------------------------------------------------

LOST_EXIT_CODE = 75  # EX_TEMPFAIL: re-running the same command resumes
_ALIVE = "lora_jax/alive/"


def stop_lost(reason: str) -> None:
    """Ends this process at once with one line saying ``reason`` and how to resume.

    ``os._exit``: a normal exit would wait in ``jax.distributed`` 's shutdown barrier for the
    lost process (minutes), then abort with pages of coordination-service logs.
    """
    print(  # on a line of its own after any progress bar
        f"\nerror: {reason}; this process stops too (exit code {LOST_EXIT_CODE}). Re-run the same "
        "command on every process: the run resumes from its last checkpoint.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(LOST_EXIT_CODE)


def watch_processes(
    timeout_s: float = 30.0,
    interval_s: float = 1.0,
    *,
    on_lost: Callable[[str], None] = stop_lost,
) -> threading.Thread | None:
    """Starts a daemon thread that calls ``on_lost(reason)`` when another process of the run
    stops responding: a process whose heartbeat (a counter it writes to the coordination
    service's key-value store every ``interval_s``) has not moved for ``timeout_s``, or the
    coordination service itself (process 0) gone. Returns the thread, or None on one process.

    Without it a process whose peer died waits in its next collective, or in JAX's own
    heartbeat timeout, then aborts with pages of logs; with it, it stops within about
    ``timeout_s`` with one line (:func:`stop_lost`). Keep ``timeout_s`` below JAX's
    ``heartbeat_timeout_seconds`` (100 s) and above the longest pause of this thread.
    """
    if jax.process_count() == 1:
        return None
    from jax._src import distributed as jax_distributed  # the client jax.distributed started

    client = jax_distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()

    def beat() -> None:
        start = time.monotonic()
        seen: dict[int, tuple[str | None, float]] = {p: (None, start) for p in range(n) if p != me}
        count = 0
        while True:
            count += 1
            try:
                client.key_value_set(f"{_ALIVE}{me}", str(count), allow_overwrite=True)
                values = dict(client.key_value_dir_get(_ALIVE))
            except Exception as err:  # noqa: BLE001 - any failure means the service is gone
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                on_lost(f"lost the coordination service of process 0 ({first[:200]})")
                return
            now = time.monotonic()
            for p, (value, since) in seen.items():
                current = values.get(f"{_ALIVE}{p}")
                if current != value:
                    seen[p] = (current, now)
                elif now - since > timeout_s:
                    on_lost(f"process {p} of {n} sent no heartbeat for {timeout_s:g} s")
                    return
            time.sleep(interval_s)

    thread = threading.Thread(target=beat, name="lora_jax-watch-processes", daemon=True)
    thread.start()
    return thread


_LOST_PEER = ("connection closed by peer", "connection reset", "heartbeat", "unavailable")


def lost_peer(err: BaseException) -> str | None:
    """The reason, if ``err`` (raised by a collective on several processes) says that another
    process is gone (gloo's closed connection, the coordination service's missed heartbeat),
    else None."""
    if jax.process_count() == 1 or not isinstance(err, jax.errors.JaxRuntimeError):
        return None
    text = str(err)
    if not any(marker in text.lower() for marker in _LOST_PEER):
        return None
    first = text.strip().splitlines()[0]
    return f"another process of the run is gone ({first[:200]})"


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


def smallest(value: int) -> int:
    """The smallest of every process's ``value`` (itself on one process), so that choices made
    from it (a memory budget, a block size) agree across processes. Collective."""
    if jax.process_count() == 1:
        return int(value)
    # As two 31-bit words: without jax_enable_x64 an int64 would be cut to int32 on the way.
    words = np.asarray([int(value) >> 31, int(value) & (2**31 - 1)], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(words)).reshape(-1, 2)
    return min((int(hi) << 31) + int(lo) for hi, lo in gathered)


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
