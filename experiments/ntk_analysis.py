"""NTK-regime analysis of one LoRA cell: linearized training, kernel regression, agreement.

For a LoRA cell of an experiment with ``ntk=True``, after real fine-tuning this trains the
linearized LoRA model of Jang et al. (linear in the base weights at W0, LoRA-factorized update)
with the same loop, optimizer, loss, data and seed, then asks :func:`ntk.ntk_regime_report` how
real fine-tuning, the linearized model and eNTK kernel regression compare on the test set.

Which kernels (``--ntk-kernel``, :class:`experiments.config.KernelChoice`): by default the
SGD eNTK (as before) and, for AdamW cells, the kernel matching their optimizer (Malladi et al.
2023): Adam's asymmetric A-SignGD kernel; ``both`` gives the two for every cell. Record keys
of the SGD kernel are as they always were (``ntk_acc_kernel``, ...); those of another kernel
end in its name (``ntk_acc_kernel_asigngd``, ...), so records of different kernels never mix.

On a mesh (``--mesh``, several processes too) the linearized model trains on it as the cell
did, and every kernel splits its rows over the mesh's ``data`` axis (:func:`kernel_mesh`); every
process runs the analysis with the same arguments and gets the same fields (only process 0
writes them, as every record).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import ntk
from experiments.config import KernelChoice
from lora_jax import distributed, lora, programs, train
from lora_jax import sharding as sh
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss
from lora_jax.optim import Optimizer

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


# Shown when some record has them: the columns of the kernels other than the SGD eNTK.
OPTIONAL_COLUMNS = {
    "ntk_acc_kernel_asigngd": "A-SignGD kernel",
    "ntk_agree_trained_vs_kernel_asigngd": "agree FT/A-SignGD",
    "ntk_kernel_relative_change_asigngd": "A-SignGD change",
    "ntk_acc_kernel_signgd": "SignGD kernel",
}


def kernels_for(choice: KernelChoice | str, optimizer: Optimizer) -> list[ntk.Kernel]:
    """The kernels of ``choice`` for a cell trained with ``optimizer``, the first reported in
    full (kernel change included), the others by their predictions."""
    choice = KernelChoice(choice)
    if choice == KernelChoice.MATCHED:  # the SGD eNTK's records as before, and Adam's kernel
        return [ntk.Kernel.SGD] + [ntk.Kernel.ASIGNGD] * (optimizer == Optimizer.ADAMW)
    if choice == KernelChoice.BOTH:
        return [ntk.Kernel.SGD, ntk.Kernel.ASIGNGD]
    return [ntk.Kernel(choice.value)]


def _suffix(key: str, kernel: ntk.Kernel) -> str:
    """A kernel-dependent record key: as before for the SGD kernel, else ``<key>_<kernel>``."""
    return key if kernel == ntk.Kernel.SGD else f"{key}_{kernel.value}"


# The kernels' options (experiments.plan --ntk compiles the same): the full [N, N, K, K] kernel
# (exact linearized dynamics) of a model independent per example, in blocks of 128 rows of
# [train; test] by 64 train rows.
TRACE_AXES = ()
VMAP_AXES = 0
KERNEL_BATCH_SIZE = (128, 64)
SMALLEST_BLOCK = 8  # rows: below this a block's fixed costs dominate; a refusal stands


def in_blocks_that_fit(
    compute: Callable[[tuple[int, int]], Any], sizes: tuple[int, int] = KERNEL_BATCH_SIZE
) -> Any:
    """``compute(sizes)`` with the kernel blocks halved while they do not fit in memory.

    A block's memory is checked against what the machine has free when it runs
    (:class:`ntk.KernelMemoryError`), which moves with whatever else runs there; a kernel is
    the same in any blocks, so an hours-long run retries smaller ones (one line each, down to
    :data:`SMALLEST_BLOCK` rows) instead of stopping. Completed kernels come back from the
    run's kernel cache. On several processes the budget is agreed, so all retry alike.
    """
    while True:
        try:
            return compute(sizes)
        except ntk.KernelMemoryError as err:
            smaller = tuple(max(SMALLEST_BLOCK, s // 2) for s in sizes)
            if smaller == sizes:
                raise
            if distributed.is_primary():
                print(f"{err} Retrying with kernel blocks of {smaller} rows.", file=sys.stderr)
            sizes = smaller


def kernel_mesh(mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """Where the kernels of a run on ``mesh`` are computed (``experiments.plan --ntk`` compiles
    them so too): the ``mesh``, ``data_axis`` and ``fsdp_axis`` options of
    :func:`ntk.empirical_ntk_fn`, with each block's rows over the ``data`` axis and the
    parameters split over ``fsdp`` when the mesh has that axis (else replicated); ``{}`` (one
    device) without a mesh.

    Raises:
      ConfigError: a mesh without a ``data`` axis.
    """
    if mesh is None:
        return {}
    if "data" not in mesh.axis_names:
        axes = ",".join(f"{a}={n}" for a, n in mesh.shape.items())
        raise ConfigError(
            f"--ntk splits the kernels' rows over the mesh's data axis, and --mesh {axes} has "
            "none: give the mesh a data axis (e.g. --mesh data=N or data=N/k,fsdp=k)."
        )
    fsdp = "fsdp" if "fsdp" in mesh.axis_names else None
    return {"mesh": mesh, "data_axis": "data", "fsdp_axis": fsdp}


KERNEL_KEYS = (
    "acc_kernel",
    "agree_trained_vs_kernel",
    "dist_trained_vs_kernel",
    "kernel_relative_change",
    "kernel_alignment",
)


def linearized_fusion(mesh, rules, batch_size: int) -> lora.Fusion:
    """How the linearized model's tangent is computed (``ntk.lora_linearized_model_fn``'s
    ``fusion``): through the LoRA factors (``fused``) when its training runs data parallel on
    ``mesh`` (a step then all-reduces the adapters' gradients, not the dense (in, out)
    gradient of every adapted kernel), else the dense JVP (``merged``), which costs fewer
    FLOPs on one device or as member slots (``benchmarks/README.md``, "The linearized LoRA
    model")."""
    if mesh is None:
        return lora.Fusion.MERGED
    table = sh.rules_for_mesh(mesh) if rules is None else dict(rules)
    ways = sh.batch_ways(mesh, table)
    parallel = ways > 1 and programs.member_slots(mesh, table, 1, batch_size) == 1
    return lora.Fusion.FUSED if parallel else lora.Fusion.MERGED


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
    kernel_choice: KernelChoice | str = KernelChoice.MATCHED,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
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
      kernel_choice: which kernels (:class:`KernelChoice`; by default the optimizer's).
      mesh, rules: the run's mesh and rule table (``experiments.launch``): the linearized model
        trains on them (as ``lora_jax.train.fit``) and the kernels split their rows over the
        mesh (:func:`kernel_mesh`). On several processes every process calls with the same
        arguments. None: one device.
    """
    fusion = linearized_fusion(mesh, rules, tcfg.batch_size)
    lin_fn = model_fn_cache(
        ("linearized", cell.task, cell.rank, fusion),
        lambda: ntk.lora_linearized_model_fn(output_fn, lora_config, fusion=fusion),
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
        mesh=mesh,
        rules=rules,
    )
    linearized_adapters = distributed.to_host(linearized.best_trainable)  # off the mesh
    kernels = kernels_for(kernel_choice, tcfg.optimizer)
    solver = ntk.KernelSolver.MSE if tcfg.loss == Loss.MSE else ntk.KernelSolver.LOGISTIC
    options = dict(
        kernel_solver=solver,
        trace_axes=TRACE_AXES,
        vmap_axes=VMAP_AXES,
        cache_dir=os.path.join(run_dir, "kernel_cache"),
        progress=distributed.is_primary(),
        **kernel_mesh(mesh),
    )
    report = in_blocks_that_fit(
        lambda sizes: ntk.ntk_regime_report(
            output_fn,
            params,
            lora_config,
            adapters0,
            adapters,
            data.train,
            data.test,
            linearized_adapters=linearized_adapters,
            kernel=kernels[0],
            implementation=kernel_implementation(kernels[0]),
            kernel_batch_size=sizes,
            **options,
        )
    )
    distributed.barrier(f"linearized {name}")  # every process is done with the checkpoint
    if distributed.is_primary():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    report = {_suffix(k, kernels[0]) if k in KERNEL_KEYS else k: v for k, v in report.items()}
    if len(kernels) > 1:  # the trained outputs again: cheap next to a kernel
        f, _, _ = ntk.lora_kernel_model(output_fn, params, adapters0, lora_config)
        y_trained = ntk.diagnostics.batched_outputs(jax.jit(f), adapters, data.test)
    for kernel in kernels[1:]:
        y_kernel = in_blocks_that_fit(
            lambda sizes, kernel=kernel: ntk.kernel_predictions(
                output_fn,
                params,
                lora_config,
                adapters0,
                data.train,
                data.test,
                kernel=kernel,
                implementation=kernel_implementation(kernel),
                kernel_batch_size=sizes,
                **options,
            )
        )
        agree = ntk.prediction_agreement(y_kernel, y_trained)
        labels = np.asarray(data.test["labels"])
        report[_suffix("acc_kernel", kernel)] = float(np.mean(y_kernel.argmax(-1) == labels))
        report[_suffix("agree_trained_vs_kernel", kernel)] = agree["argmax_agreement"]
        report[_suffix("dist_trained_vs_kernel", kernel)] = agree["relative_distance"]
    return {
        f"ntk_{key}": value
        for key, value in report.items()
        if value is None or isinstance(value, int | float)
    }


def kernel_implementation(kernel: ntk.Kernel) -> ntk.NtkImplementation:
    """STRUCTURED_DERIVATIVES for the SGD eNTK (as before: fastest on adapter kernels); the
    sign kernels need per-example gradients (JACOBIAN_CONTRACTION)."""
    if kernel == ntk.Kernel.SGD:
        return ntk.NtkImplementation.STRUCTURED_DERIVATIVES
    return ntk.NtkImplementation.JACOBIAN_CONTRACTION
