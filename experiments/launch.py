"""How a run is laid out on the hardware: the mesh and the processes (never part of the results).

These flags change where the arrays live, not what is computed, so they are not fields of
:class:`experiments.config.ExperimentConfig`: a run may be resumed on another mesh or number
of processes (its finished cells are kept; a job of several cells split over the devices resumes
its checkpoint on a mesh that splits it into as many parts). ``--mesh data=4,fsdp=2`` picks the
devices' layout (default: every device on ``data``, i.e. data parallel); ``--coordinator
HOST:PORT --num-processes N --process-id I`` (or a bare ``--distributed`` on TPU / SLURM) joins a
multi-process run. On accelerators, compiled programs are kept in JAX's persistent compilation
cache (:func:`enable_compilation_cache`), so a rerun, a resumed run or another run of the same
shapes starts without compiling again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
from jax.sharding import Mesh

from lora_jax import distributed
from lora_jax import sharding as sh
from lora_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
    """Mesh and process flags (the CLI maps onto these fields one-to-one).

    Attributes:
      mesh: ``"data=4,fsdp=2,tensor=1"``-style mesh (axes ``data``, ``fsdp``, ``tensor``); None
        runs on one device when there is one process, else ``data=<all devices>``.
      rules: sharding preset(s) of :mod:`lora_jax.sharding` joined by ``+`` (``dp``, ``fsdp``,
        ``tp``, ...); None picks the presets of the mesh's axes.
      coordinator: ``HOST:PORT`` of process 0 (multi-process runs).
      num_processes: number of processes.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      distributed: ``jax.distributed.initialize()`` from the environment (TPU pods, SLURM).
      process_timeout: on several processes, seconds without a heartbeat from another process
        after which this one stops with one line and exit code 75 (re-run the same command to
        resume; :func:`lora_jax.distributed.watch_processes`).
      compilation_cache: directory (or ``gs://`` URL) of JAX's persistent compilation cache, or
        ``off``; default ``$LORA_JAX_COMPILATION_CACHE``, else ``~/.cache/lora_jax/jax`` on
        accelerators and off on the CPU backend (:func:`enable_compilation_cache`).
    """

    mesh: str | None = None
    rules: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False
    process_timeout: float = 30.0
    compilation_cache: str | None = None


CACHE_ENV = "LORA_JAX_COMPILATION_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "lora_jax", "jax")
_TYPES = {"num_processes": int, "process_id": int, "process_timeout": float}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the :class:`Launch` flags to ``parser``."""
    group = parser.add_argument_group("devices and processes (do not change the results)")
    for field in dataclasses.fields(Launch):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            group.add_argument(flag, action="store_true", default=None)
        else:
            group.add_argument(flag, type=_TYPES.get(field.name, str))


def pop_launch(args: dict) -> Launch:
    """Removes the :class:`Launch` entries from parsed ``args`` and returns them."""
    values = {f.name: args.pop(f.name) for f in dataclasses.fields(Launch)}
    return Launch(**{k: v for k, v in values.items() if v is not None})


def start(launch: Launch) -> tuple[Mesh | None, dict | None]:
    """Joins the processes (if asked); returns ``(mesh, rules)``, None for one device.

    Raises:
      ValueError: bad process flags, an unknown mesh axis, a mesh whose size is not the number
        of devices, or rules naming a mesh axis the mesh lacks (one line each).
    """
    if not launch.process_timeout > 0:
        raise ConfigError(
            f"--process-timeout {launch.process_timeout:g} must be a positive number of "
            "seconds (default 30)."
        )
    distributed.initialize(
        launch.coordinator, launch.num_processes, launch.process_id, auto=launch.distributed
    )
    enable_compilation_cache(launch.compilation_cache)  # after initialize: it reads the backend
    distributed.watch_processes(launch.process_timeout)
    if launch.mesh is not None:
        mesh = sh.make_mesh(launch.mesh)
    elif jax.process_count() > 1 or launch.rules is not None:
        mesh = sh.make_mesh({"data": jax.device_count()})
    else:
        return None, None
    rules = sh.rules_for_mesh(mesh) if launch.rules is None else sh.rules(launch.rules)
    sh.check_rules(rules, mesh)
    return mesh, rules


def enable_compilation_cache(where: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None: off).

    ``where``: a directory or URL, or ``off``; None takes ``$LORA_JAX_COMPILATION_CACHE`` (which
    may say ``off`` too), else :data:`DEFAULT_CACHE` when the default backend is an accelerator.
    Programs are cached by their HLO and compile options, so the same program from another run
    (or another task of the same shapes) loads instead of compiling; every program that took
    over a second to compile is kept.

    Not by default on the CPU backend: there JAX rejects every entry it loads (XLA:CPU takes
    its own tuning flags, ``+prefer-no-scatter``, for CPU features the host lacks;
    jax-ml/jax#38445), so a rerun compiles anyway and prints a page of errors per program. An
    explicit ``where`` is still honoured.
    """
    where = where or os.environ.get(CACHE_ENV)
    if where is None:
        if jax.default_backend() == "cpu":
            return None
        where = DEFAULT_CACHE
    if where.lower() in ("off", "none", "0", "false"):
        return None
    where = where if "://" in where else os.path.abspath(os.path.expanduser(where))
    jax.config.update("jax_compilation_cache_dir", where)
    return where
