"""ntk: NTK-regime tools built on neural-tangents.

Linearize a model in any parameter subset (all weights, a regex subset, LoRA adapters), compute
its empirical NTK on the K outputs (blocked, memory-checked, cached; embedding tables
compacted to the rows read, :mod:`ntk.compact`), predict with kernel
solvers, and measure how close real fine-tuning stayed to the NTK regime. neural-tangents is
imported only through :mod:`ntk._compat` (``from ntk._compat import nt``).
"""

from ntk.diagnostics import (
    batched_outputs,
    kernel_distance,
    linearization_error,
    ntk_regime_report,
    prediction_agreement,
    relative_weight_change,
)
from ntk.kernel import (
    KernelMemoryError,
    NtkImplementation,
    available_memory,
    empirical_ntk_fn,
    kernel_matrix,
)
from ntk.linearize import (
    linearize,
    linearized_model_fn,
    lora_linearized_model_fn,
    lora_weight_delta,
)
from ntk.model_fn import (
    FingerprintError,
    ModelFn,
    cast_floating,
    check_outputs,
    fingerprint,
    fn_fingerprint,
    lora_model_fn,
    model_fn,
)
from ntk.solvers import (
    LogisticFit,
    Predictions,
    SvmFit,
    ce_gradient_flow,
    function_space_gd,
    kernel_logistic_regression,
    kernel_svm,
    mse_predict,
    targets,
)

__all__ = [
    "FingerprintError",
    "KernelMemoryError",
    "LogisticFit",
    "ModelFn",
    "NtkImplementation",
    "Predictions",
    "SvmFit",
    "available_memory",
    "batched_outputs",
    "cast_floating",
    "ce_gradient_flow",
    "check_outputs",
    "empirical_ntk_fn",
    "fingerprint",
    "fn_fingerprint",
    "function_space_gd",
    "kernel_distance",
    "kernel_logistic_regression",
    "kernel_matrix",
    "kernel_svm",
    "linearization_error",
    "linearize",
    "linearized_model_fn",
    "lora_linearized_model_fn",
    "lora_model_fn",
    "lora_weight_delta",
    "model_fn",
    "mse_predict",
    "ntk_regime_report",
    "prediction_agreement",
    "relative_weight_change",
    "targets",
]
