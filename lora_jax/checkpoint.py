"""Orbax checkpoints of a pytree plus JSON metadata, keeping the latest, for resumable runs.

A checkpoint directory is a local path or any ``etils.epath`` URL (``gs://bucket/run/ckpt`` on
a TPU pod, ``s3://...``), read and written through orbax.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath


class Restored(NamedTuple):
    """A restored checkpoint: its step, the pytree, and the JSON metadata saved with it."""

    step: int
    tree: Any
    meta: dict


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
    """``directory`` as an ``epath.Path``: a URL (``gs://...``) as it is, a local path made
    absolute (orbax needs absolute local paths)."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else path.absolute()


def _manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        checkpoint_path(directory), options=options, item_names=("tree", "meta")
    )


def save(directory: str | os.PathLike, step: int, tree: Any, meta: dict) -> None:
    """Saves ``tree`` (any pytree of arrays) and JSON-able ``meta`` as checkpoint ``step``.

    Older checkpoints in ``directory`` are deleted once this one is complete, so a run stopped
    mid-save still has the previous one.
    """
    with _manager(directory) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        mngr.wait_until_finished()


def restore(directory: str | os.PathLike, target: Any) -> Restored | None:
    """Restores the latest checkpoint in ``directory`` shaped like ``target``; None if none.

    Args:
      directory: the checkpoint directory given to :func:`save`.
      target: a pytree with the structure, shapes and dtypes of the saved one (e.g. a fresh
        state); only its structure is used.
    """
    if not checkpoint_path(directory).is_dir():
        return None
    with _manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    return Restored(step, out["tree"], out["meta"])
