"""NTK-regime analysis of one LoRA cell: linearized training, kernel regression, agreement.

For a LoRA cell of an experiment with ``ntk=True``, after real fine-tuning this trains the
linearized LoRA model of Jang et al. (linear in the base weights at W0, LoRA-factorized update)
with the same loop, optimizer, loss, data and seed, then asks :func:`ntk.ntk_regime_report` how
real fine-tuning, the linearized model and eNTK kernel regression compare on the test set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import ntk
from lora_jax import lora, train
from lora_jax.losses import Loss

# Report columns: record key -> header.
COLUMNS = {
    "ntk_acc_trained": "fine-tuned",
    "ntk_acc_linearized_trained": "linearized",
    "ntk_acc_kernel": "eNTK kernel",
    "ntk_agree_trained_vs_lin_trained": "agree FT/lin",
    "ntk_agree_trained_vs_kernel": "agree FT/kernel",
    "ntk_kernel_relative_change": "kernel change",
    "ntk_weight_change_adapted": "weight change",
    "ntk_linearization_error_end": "lin. error",
}


def analyze(
    *,
    cell: Any,
    output_fn: Callable,
    params: Any,
    lora_config: lora.LoraConfig,
    adapters0: Any,
    adapters: Any,
    data: Any,
    tcfg: train.TrainConfig,
    model_fn_cache: Callable,
    run_dir: str,
) -> dict[str, float | None]:
    """Linearized training + :func:`ntk.ntk_regime_report`; returns ``ntk_*`` record fields.

    Args:
      cell: the experiment cell (task, rank, seed), for names.
      output_fn: ``output_fn(params, batch) -> [B, K]``.
      params: frozen base params W0.
      lora_config: the cell's LoRA config.
      adapters0: adapters at initialization; adapters: best-dev adapters of real fine-tuning.
      data: the cell's TaskData (train, dev, test).
      tcfg: the training config of real fine-tuning (reused for the linearized model).
      model_fn_cache: ``(key, build) -> model_fn``, so seeds share compiled programs.
      run_dir: the run directory (checkpoints of the linearized run, kernel cache).
    """
    lin_fn = model_fn_cache(
        ("linearized", cell.task, cell.rank),
        lambda: ntk.lora_linearized_model_fn(output_fn, lora_config),
    )
    name = cell.key.replace("/", "_") + "_linearized"
    ckpt_dir = os.path.join(run_dir, "ckpt", name)
    state = train.init_state(adapters0, train.make_optimizer(tcfg), tcfg.seed)
    linearized = train.fit(
        lin_fn,
        state,
        params,
        data.train,
        data.dev,
        tcfg,
        checkpoint_dir=ckpt_dir,
        progress=f"{cell.key} (linearized)",
    )
    report = ntk.ntk_regime_report(
        output_fn,
        params,
        lora_config,
        adapters0,
        adapters,
        data.train,
        data.test,
        linearized_adapters=linearized.best_trainable,
        kernel_solver=ntk.KernelSolver.MSE if tcfg.loss == Loss.MSE else ntk.KernelSolver.LOGISTIC,
        trace_axes=(),  # the full [N, N, K, K] kernel: exact linearized dynamics
        implementation=ntk.NtkImplementation.STRUCTURED_DERIVATIVES,
        cache_dir=os.path.join(run_dir, "kernel_cache"),
        progress=True,
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {
        f"ntk_{key}": value
        for key, value in report.items()
        if value is None or isinstance(value, int | float)
    }
