"""ntk: NTK-regime tools built on neural-tangents.

Linearize a model in any parameter subset (all weights, a regex subset, LoRA adapters), compute
its empirical NTK on the K outputs (blocked, memory-checked, cached; embedding tables
compacted to the rows read, :mod:`ntk.compact`), predict with kernel
solvers, and measure how close real fine-tuning stayed to the NTK regime. neural-tangents is
imported only through :mod:`ntk._compat` (``from ntk._compat import nt``).

One option vocabulary across entry points, as in neural-tangents: ``trace_axes=(-1,)`` and
``diagonal_axes=()`` by default everywhere, one regulariser name ``diag_reg`` (its scale per
solver: :mod:`ntk.solvers`), enums for choices (:class:`NtkImplementation`,
:class:`KernelSolver`, :class:`Linearization`, :class:`Kernel` (which optimizer's
kernel: SGD, SignGD or Adam's asymmetric A-SignGD, :mod:`ntk.optimizer`),
``lora_jax.losses.Loss``; each also accepts
its value). What a kernel may exploit about a model function travels as data
(:class:`ModelInfo`, returned by :func:`kernel_model` / :func:`lora_kernel_model` and passed as
``empirical_ntk_fn(..., model_info=)``), never as attributes of the function.

Helpers outside this list (``fingerprint``, ``cast_floating``, ``check_outputs``,
``batched_outputs``, ``available_memory``, ``targets``) stay importable from their modules.
"""

from ntk.asymmetric import AsymmetricFit, asymmetric_ls
from ntk.diagnostics import (
    KernelSolver,
    Linearization,
    kernel_distance,
    kernel_predictions,
    linearization_error,
    ntk_regime_report,
    prediction_agreement,
    relative_weight_change,
)
from ntk.kernel import (
    KernelMemoryError,
    NtkImplementation,
    auto_implementation,
    empirical_ntk_fn,
    kernel_matrix,
)
from ntk.linearize import (
    linearize,
    linearized_model_fn,
    lora_linearized_model_fn,
    lora_weight_delta,
)
from ntk.models import (
    FingerprintError,
    KernelModel,
    ModelInfo,
    kernel_model,
    lora_kernel_model,
)
from ntk.optimizer import Kernel
from ntk.solvers import (
    LogisticFit,
    Predictions,
    SvmFit,
    ce_gradient_flow,
    function_space_gd,
    kernel_logistic_regression,
    kernel_svm,
    mse_predict,
)

__all__ = [
    "AsymmetricFit",
    "FingerprintError",
    "Kernel",
    "KernelMemoryError",
    "KernelModel",
    "KernelSolver",
    "Linearization",
    "LogisticFit",
    "ModelInfo",
    "NtkImplementation",
    "Predictions",
    "SvmFit",
    "asymmetric_ls",
    "auto_implementation",
    "ce_gradient_flow",
    "empirical_ntk_fn",
    "function_space_gd",
    "kernel_distance",
    "kernel_logistic_regression",
    "kernel_matrix",
    "kernel_model",
    "kernel_predictions",
    "kernel_svm",
    "linearization_error",
    "linearize",
    "linearized_model_fn",
    "lora_kernel_model",
    "lora_linearized_model_fn",
    "lora_weight_delta",
    "mse_predict",
    "ntk_regime_report",
    "prediction_agreement",
    "relative_weight_change",
]
