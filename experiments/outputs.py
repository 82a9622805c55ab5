"""What a run keeps besides its results: saved adapters (``--save-adapters``) and TensorBoard
curves (``--tensorboard``), one directory per cell under the run directory.

``adapters/<cell>/`` is a PEFT LoRA adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, written by `lora_jax.lora.save_peft`) and ``task.json``: the
task's label words, template and text fields, the model and head it was trained on, the
label-word token ids and the cell's accuracies, all a user needs to rebuild the classifier.
Load it with ``lora_jax.models.from_pretrained(base, head=..., adapter=dir)`` or PEFT's
``PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(base), dir)``.

``tensorboard/<cell>/`` holds tensorboardX event files: ``train/loss``, ``dev/accuracy`` and
``dev/loss`` at every evaluation (from the cell's ``metrics/<cell>.jsonl``) and
``dev/accuracy`` / ``test/accuracy`` of the selected checkpoint, written when the cell ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from experiments import report
from lora_jax import lora, tasks
from lora_jax.errors import UserError

ADAPTERS_DIR = "adapters"
TENSORBOARD_DIR = "tensorboard"
TASK_INFO_NAME = "task.json"


class MissingExtraError(UserError, ImportError):
    """An optional dependency that a flag needs is not installed (the message says how to)."""


def cell_dir_name(cell_key: str) -> str:
    """``mr/lora-r1/seed13`` -> ``mr_lora-r1_seed13`` (as the run's ``metrics/`` files)."""
    return cell_key.replace("/", "_")


# ----------------------------------------------------------------------------- adapters


def save_adapter(
    run_dir: str,
    cell_key: str,
    adapters: Mapping,
    lora_config: lora.LoraConfig,
    info: Mapping[str, Any],
    *,
    base_model: str,
) -> str:
    """Writes one cell's adapter as a PEFT directory plus ``task.json``; returns the directory.

    Args:
      run_dir: the run directory.
      cell_key: the cell (`experiments.run.Cell.key`).
      adapters: ``{module path: {lora_a (in, r), lora_b (r, out), ...}}``, the best-dev adapter.
      lora_config: its configuration.
      info: written to ``task.json`` (task fields, head, label-word ids, accuracies).
      base_model: the base model's path or hub id (PEFT's ``base_model_name_or_path``).
    """
    directory = os.path.join(run_dir, ADAPTERS_DIR, cell_dir_name(cell_key))
    lora.save_peft(directory, adapters, lora_config, base_model_name_or_path=base_model)
    tmp = os.path.join(directory, TASK_INFO_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(info), f, indent=2)
    os.replace(tmp, os.path.join(directory, TASK_INFO_NAME))
    return directory


def task_info(task: tasks.Task, word_style: str) -> dict[str, Any]:
    """The fields of ``task`` that turn an encoder into its classifier (for ``task.json``)."""
    return {
        "task": task.name,
        "source": task.source,
        "text_fields": list(task.text_fields),
        "label_names": list(task.label_names),
        "label_words": list(task.label_words),
        "template": task.template,
        "word_style": word_style,
        "words": list(task.words(word_style)),  # the label words as the tokenizer sees them
    }


# ----------------------------------------------------------------------------- TensorBoard


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``.

    Raises:
      MissingExtraError: tensorboardX is not installed; the message says how to install it.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise MissingExtraError(
            "--tensorboard needs the tensorboardX package (no TensorFlow needed); install it with "
            "`uv sync --extra tensorboard` (or `pip install tensorboardX`), or drop --tensorboard"
        ) from None
    return SummaryWriter


def _tag(key: str) -> str:
    split, _, metric = key.partition("_")  # dev_accuracy -> dev/accuracy
    return f"{split}/{metric}"


def write_tensorboard(run_dir: str, cell_key: str, record: Mapping[str, Any]) -> str:
    """Writes a finished cell's curves and final accuracies as event files; returns the logdir.

    Args:
      run_dir: the run directory (its ``metrics/<cell>.jsonl`` holds the evaluations; a cell
        without training, zero-shot, has none).
      cell_key: the cell.
      record: the cell's results record (``dev_accuracy``, ``test_accuracy``, ``best_step``).
    """
    logdir = os.path.join(run_dir, TENSORBOARD_DIR, cell_dir_name(cell_key))
    evals: dict[int, dict] = {}
    metrics = os.path.join(run_dir, "metrics", cell_dir_name(cell_key) + ".jsonl")
    for r in report.read_results(metrics):  # a resumed cell may repeat a step: keep the last
        evals[int(r["step"])] = r
    writer = summary_writer_class()(logdir=logdir)
    try:
        for step, r in sorted(evals.items()):
            for key in ("train_loss", "dev_accuracy", "dev_loss"):
                writer.add_scalar(_tag(key), float(r[key]), step)
        step = int(record.get("best_step") or 0)
        writer.add_scalar("best/dev_accuracy", float(record["dev_accuracy"]), step)
        writer.add_scalar("best/test_accuracy", float(record["test_accuracy"]), step)
    finally:
        writer.close()
    return logdir


def saved_results(path: str, cfg: Any) -> dict | None:
    """The results a theory command saved at ``path`` (JSON with a ``config`` entry) if they
    were computed for the dataclass ``cfg``, else None: a finished run is not recomputed."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    same = results.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg)))
    return results if same else None


def save_results(path: str, results: dict) -> None:
    """Writes a theory command's ``results`` (with their ``config``) to ``path`` atomically (a
    temporary file, then a rename), so a stopped run never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)
