"""How far a fine-tuning run was from the NTK (lazy) regime.

Pure functions of outputs, kernels and parameters, plus :func:`ntk_regime_report`, which
runs them all for a LoRA run (base params, adapters at init and after training, train/test
batches) and returns one flat dict for an experiment's JSONL / report.

In the NTK regime (Jacot et al. 2018; Malladi et al. 2023): the trained model agrees with its
linearization and with kernel regression using the initial eNTK, the eNTK hardly moves
(relative change << 1, alignment ~ 1), the weights move little relative to their size, and
the linearization error ``||f(w_t) - f_lin(w_t)|| / ||f(w_t) - f(w_0)||`` stays << 1.
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.rows import map_rows_fn
from ntk.kernel import Axes, NtkImplementation, empirical_ntk_fn
from ntk.linearize import linearize, lora_linearized_model_fn
from ntk.models import ModelInfo, lora_kernel_model
from ntk.optimizer import Kernel, as_kernel
from ntk.solvers import kernel_logistic_regression, mse_predict

PyTree = Any
Batch = Mapping[str, Any]

__all__ = [
    "KernelSolver",
    "Linearization",
    "batched_outputs",
    "kernel_distance",
    "kernel_predictions",
    "linearization_error",
    "ntk_regime_report",
    "prediction_agreement",
    "relative_weight_change",
]


class Linearization(enum.StrEnum):
    """The linearized model :func:`ntk_regime_report` compares real fine-tuning with.

    Attributes:
      WEIGHTS: (``'weights'``, default) Jang et al.'s linearized LoRA model: linear in the base
        weights W at W0, with the LoRA update ``scale * A @ B`` plugged in
        (:func:`ntk.lora_linearized_model_fn`). Bilinear in (A, B), so it keeps LoRA's
        factorization: the model of the rank-threshold analysis. Each call is a forward pass
        plus a JVP over the adapted base weights.
      ADAPTERS: (``'adapters'``) the first-order expansion in the adapters at ``adapters0``
        (:func:`ntk.linearize`): linear in (A, B), so at B = 0 only B moves to first order,
        and its tangent kernel is exactly the eNTK the report computes. Each call is a forward
        pass plus a JVP over the adapters only (cheaper), but it is not the model whose rank
        threshold the paper studies.
    """

    WEIGHTS = "weights"
    ADAPTERS = "adapters"


class KernelSolver(enum.StrEnum):
    """The kernel predictor :func:`ntk_regime_report` runs with the initial eNTK.

    Attributes:
      MSE: (``'mse'``, default) kernel regression, the squared-error gradient flow at
        t = infinity (:func:`ntk.mse_predict`; ``diag_reg`` relative to the mean kernel trace):
        one Cholesky solve in float64, the fastest and the exact limit of the linearized model
        trained on squared error.
      LOGISTIC: (``'logistic'``) kernel logistic regression (:func:`ntk.kernel_logistic_regression`;
        ``diag_reg`` absolute, must be > 0): the cross-entropy counterpart, for runs trained on
        CE. Newton's method on ``[N K, N K]`` matrices in numpy, ``O((N K)^3)`` per
        iteration: slower, and regularized (CE has no finite optimum on separable data).
    """

    MSE = "mse"
    LOGISTIC = "logistic"


def _member(cls: type[enum.Enum], name: str, value: Any) -> Any:
    """``cls(value)`` (a member or its value), or a ConfigError naming the allowed values."""
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(
            f"{name}={value!r} is not a {cls.__name__}; pass one of {allowed}."
        ) from None


def _norm(tree: PyTree) -> float:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return float(np.sqrt(sum(np.sum(x * x) for x in leaves)))


def _safe_ratio(num: float, den: float) -> float:
    """num / den, with 0 / 0 = 0 (no change relative to no change)."""
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def prediction_agreement(outputs: Any, reference: Any) -> dict[str, float]:
    """Agreement of two models' outputs ``[N, K]`` on the same examples.

    Returns:
      ``{'argmax_agreement': fraction of examples with the same argmax,
      'relative_distance': ||outputs - reference||_F / ||reference||_F}``.
    """
    a, b = np.asarray(outputs, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ConfigError(
            f"prediction_agreement expects two [N, K] outputs of one shape; got {a.shape} and "
            f"{b.shape}: pass both models' outputs on the same examples."
        )
    return {
        "argmax_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "relative_distance": _safe_ratio(float(np.linalg.norm(a - b)), float(np.linalg.norm(b))),
    }


def kernel_distance(k0: Any, k1: Any) -> dict[str, float]:
    """Change between two kernels of one shape (e.g. eNTK at init and after training).

    Returns:
      ``{'relative_change': ||k1 - k0||_F / ||k0||_F,
      'alignment': <k0, k1>_F / (||k0||_F ||k1||_F)}`` (kernel alignment, a cosine: 1 when
      the kernel only rescales).
    """
    a, b = np.asarray(k0, np.float64).ravel(), np.asarray(k1, np.float64).ravel()
    if a.shape != b.shape:
        raise ConfigError(
            f"kernel_distance expects kernels of one shape; got {np.shape(k0)} vs "
            f"{np.shape(k1)}: compute both on the same inputs with the same trace_axes."
        )
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return {
        "relative_change": _safe_ratio(float(np.linalg.norm(b - a)), float(na)),
        "alignment": _safe_ratio(float(a @ b), float(na * nb)),
    }


def relative_weight_change(params: PyTree, params0: PyTree) -> float:
    """``||params - params0|| / ||params0||`` over all leaves (float64 on host)."""
    diff = jax.tree.map(
        lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), params, params0
    )
    return _safe_ratio(_norm(diff), _norm(params0))


def batched_outputs(f: Callable, params: PyTree, batch: Batch, batch_size: int = 64) -> np.ndarray:
    """``f(params, batch)`` evaluated in even padded blocks of at most ``batch_size`` rows.

    Returns ``[N, K]`` (host). One compiled program per (f, batch_size, shapes), reused across
    calls (:func:`lora_jax.rows.map_rows`).
    """
    return np.asarray(_blocked(f, batch_size)(params, dict(batch)))


_blocked = functools.lru_cache(maxsize=8)(map_rows_fn)


def linearization_error(
    f: Callable,
    params0: PyTree,
    checkpoints: Sequence[PyTree],
    batch: Batch,
    *,
    eval_batch_size: int = 64,
) -> np.ndarray:
    """Relative linearization error along training, one value per checkpoint.

    ``||f(w_t) - f_lin(w_t)||_F / ||f(w_t) - f(w_0)||_F`` with
    ``f_lin(w) = f(w_0) + J(w_0)(w - w_0)`` (0 / 0 = 0, e.g. at ``w_t = w_0``).

    Args:
      f: ``f(params, batch) -> [N, K]``.
      params0: w_0, the expansion point.
      checkpoints: parameters w_t along training (same structure as params0).
      batch: examples to evaluate on.
      eval_batch_size: rows per forward-pass chunk (as in :func:`ntk_regime_report`).

    Returns:
      ``[len(checkpoints)]`` float64.
    """
    f, f_lin = jax.jit(f), jax.jit(linearize(f, params0))
    y0 = batched_outputs(f, params0, batch, eval_batch_size)
    errors = []
    for w in checkpoints:
        y = batched_outputs(f, w, batch, eval_batch_size)
        y_lin = batched_outputs(f_lin, w, batch, eval_batch_size)
        errors.append(_safe_ratio(float(np.linalg.norm(y - y_lin)), float(np.linalg.norm(y - y0))))
    return np.asarray(errors)


def _accuracy(outputs: np.ndarray, batch: Batch) -> float | None:
    if "labels" not in batch:
        return None
    return float(np.mean(np.asarray(outputs).argmax(-1) == np.asarray(batch["labels"])))


def _same_shapes(train: Batch, test: Batch) -> bool:
    return jax.tree.structure(train) == jax.tree.structure(test) and all(
        np.shape(a)[1:] == np.shape(b)[1:]
        for a, b in zip(jax.tree.leaves(train), jax.tree.leaves(test), strict=True)
    )


def _kernel_fit(
    f: Callable,
    info: ModelInfo,
    params0: PyTree,
    train: Batch,
    test: Batch,
    y_init_train: np.ndarray,
    y_init_test: np.ndarray,
    *,
    kernel: Kernel | str,
    kernel_solver: KernelSolver | str,
    diag_reg: float,
    trace_axes: Axes,
    vmap_axes: Any,
    implementation: NtkImplementation | int,
    kernel_batch_size: int | tuple[int, int],
    cache_dir: str | os.PathLike | None,
    progress: bool,
    mesh: jax.sharding.Mesh | None,
    data_axis: str,
    fsdp_axis: str | None,
) -> tuple[np.ndarray, np.ndarray, Callable[[PyTree], np.ndarray]]:
    """``(test predictions [M, K], K(train, train) at params0, params -> K(train, train))``."""
    kernel = as_kernel(kernel)
    kernel_solver = _member(KernelSolver, "kernel_solver", kernel_solver)
    ntk_fn = empirical_ntk_fn(
        f,
        trace_axes=trace_axes,
        vmap_axes=vmap_axes,
        implementation=implementation,
        batch_size=kernel_batch_size,
        cache_dir=cache_dir,
        progress=progress,
        model_info=info,
        kernel=kernel,
        mesh=mesh,
        data_axis=data_axis,
        fsdp_axis=fsdp_axis,
    )
    n_train = int(np.shape(train["labels"])[0])
    if _same_shapes(train, test):  # one compiled block shape for [train; test] x train and
        # train x train
        both = jax.tree.map(
            lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), train, test
        )
        k_all = ntk_fn(both, train, params0)
        k_tt0, k_st0 = k_all[:n_train], k_all[n_train:]
        kernel_at = lambda p: ntk_fn(train, train, p)  # noqa: E731
    else:
        k_tt0, k_st0 = ntk_fn(train, None, params0), ntk_fn(test, train, params0)
        kernel_at = lambda p: ntk_fn(train, None, p)  # noqa: E731
    labels = np.asarray(train["labels"])
    if kernel_solver == KernelSolver.MSE:
        with jax.enable_x64():
            preds = mse_predict(
                jnp.asarray(k_tt0, jnp.float64),
                labels,
                jnp.asarray(k_st0, jnp.float64),
                y_init_train,
                y_init_test,
                t=None,
                diag_reg=diag_reg,
                trace_axes=trace_axes,
                kernel=kernel,
            )
            y_kernel = np.asarray(preds.test)
    else:
        y_kernel = kernel_logistic_regression(
            k_tt0, labels, k_st0, y_init_train, y_init_test, diag_reg=diag_reg, kernel=kernel
        ).test
    return y_kernel, k_tt0, kernel_at


def kernel_predictions(
    output_fn: Callable,
    params: PyTree,
    lora_config: Any,
    adapters0: PyTree,
    train: Batch,
    test: Batch,
    *,
    kernel: Kernel | str = Kernel.SGD,
    kernel_solver: KernelSolver | str = KernelSolver.MSE,
    diag_reg: float = 1e-6,
    trace_axes: Axes = (-1,),
    vmap_axes: Any = 0,
    implementation: NtkImplementation | int = NtkImplementation.JACOBIAN_CONTRACTION,
    kernel_batch_size: int | tuple[int, int] = (128, 64),
    eval_batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    fsdp_axis: str | None = None,
) -> np.ndarray:
    """Test predictions ``[M, K]`` of the kernel predictor of a LoRA run at ``adapters0``.

    The kernel part of :func:`ntk_regime_report` alone (same arguments, same meaning): the
    ``kernel`` (:class:`ntk.Kernel`) of the K outputs with respect to the adapters at
    initialization, solved by ``kernel_solver`` from the initial outputs. Use it for a second
    kernel on a run already reported (e.g. Adam's A-SignGD next to the SGD eNTK).
    """
    f, _, info = lora_kernel_model(output_fn, params, adapters0, lora_config)
    f_jit = jax.jit(f)
    y_init_train = batched_outputs(f_jit, adapters0, train, eval_batch_size)
    y_init_test = batched_outputs(f_jit, adapters0, test, eval_batch_size)
    y_kernel, _, _ = _kernel_fit(
        f,
        info,
        adapters0,
        train,
        test,
        y_init_train,
        y_init_test,
        kernel=kernel,
        kernel_solver=kernel_solver,
        diag_reg=diag_reg,
        trace_axes=trace_axes,
        vmap_axes=vmap_axes,
        implementation=implementation,
        kernel_batch_size=kernel_batch_size,
        cache_dir=cache_dir,
        progress=progress,
        mesh=mesh,
        data_axis=data_axis,
        fsdp_axis=fsdp_axis,
    )
    return y_kernel


def ntk_regime_report(
    output_fn: Callable,
    params: PyTree,
    lora_config: Any,
    adapters0: PyTree,
    adapters: PyTree,
    train: Batch,
    test: Batch,
    *,
    linearized_adapters: PyTree | None = None,
    checkpoints: Sequence[PyTree] = (),
    linearization: Linearization | str = Linearization.WEIGHTS,
    kernel_solver: KernelSolver | str = KernelSolver.MSE,
    diag_reg: float = 1e-6,
    trace_axes: Axes = (-1,),
    vmap_axes: Any = 0,
    implementation: NtkImplementation | int = NtkImplementation.JACOBIAN_CONTRACTION,
    kernel_batch_size: int | tuple[int, int] = (128, 64),
    eval_batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    kernel: Kernel | str = Kernel.SGD,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    fsdp_axis: str | None = None,
) -> dict[str, float | None]:
    """All NTK-regime diagnostics of one LoRA run, as a flat dict.

    The kernel is the eNTK of the K outputs with respect to the adapters (the trained
    parameters), at ``adapters0`` and at ``adapters``. The linearized model is, by default,
    Jang et al.'s (``Linearization.WEIGHTS``: linear in the base weights at W0, the
    LoRA update ``scale * A @ B`` plugged in; :func:`ntk.lora_linearized_model_fn`), or the
    first-order expansion in the adapters at ``adapters0`` (``Linearization.ADAPTERS``;
    :func:`ntk.linearize`).

    Args:
      output_fn: ``output_fn(params, batch) -> [B, K]``.
      params: frozen base params W0.
      lora_config: the adapters' ``LoraConfig``.
      adapters0: adapters at initialization; adapters: after real fine-tuning.
      train: training batch dict (with ``labels`` [N]); test: test batch dict.
      linearized_adapters: adapters after training the *linearized* model of the same kind
        (``lora_linearized_model_fn`` for WEIGHTS, ``linearized_model_fn`` for ADAPTERS) with
        the same loop; adds its agreement with the real model.
      checkpoints: adapters along real training, for the linearization-error curve.
      linearization: a :class:`Linearization` (or its value, ``'weights'`` / ``'adapters'``).
      kernel_solver: a :class:`KernelSolver` (or its value, ``'mse'`` / ``'logistic'``).
      diag_reg: the kernel solver's regulariser: relative to the mean kernel trace for MSE,
        absolute for LOGISTIC (see :mod:`ntk.solvers`).
      trace_axes: as :func:`ntk.empirical_ntk_fn` (default ``(-1,)``: the traced ``[N, N]``
        kernel, read as ``Theta (x) I_K`` by the solvers); ``()`` keeps the full
        ``[N, N, K, K]`` kernel, whose kernel regression is the exact linearized model at
        K times the memory.
      implementation, kernel_batch_size, cache_dir, progress: passed to
        :func:`ntk.empirical_ntk_fn`.
      vmap_axes: passed to :func:`ntk.empirical_ntk_fn`; the default 0 declares the model
        independent per example (true for the encoders without dropout), which makes the
        kernel cost linear instead of quadratic in the block size. Use None otherwise.
      eval_batch_size: rows per forward-pass chunk.
      kernel: which optimizer's kernel (:class:`ntk.Kernel`): the SGD eNTK (default), or
        Adam's A-SignGD kernel (``ASIGNGD``, for AdamW runs; its solvers use general solves)
        or SIGNGD; the sign kernels need ``implementation=JACOBIAN_CONTRACTION``. The kernel
        predictor and the kernel change are of this kernel.
      mesh, data_axis, fsdp_axis: passed to :func:`ntk.empirical_ntk_fn`: the kernels' rows
        split over the mesh's ``data_axis`` (the parameters over ``fsdp_axis`` if given); the
        mesh may span several processes, each calling with the same arguments (every one gets
        the whole report). The forward passes and the solvers run on each process alone.

    Returns:
      Keys (None where not computable): ``acc_trained``, ``acc_linearized_at_trained``,
      ``acc_linearized_trained``, ``acc_kernel``, ``acc_init``; ``agree_trained_vs_lin``,
      ``dist_trained_vs_lin`` (linearization evaluated at the trained adapters);
      ``agree_trained_vs_lin_trained``, ``dist_trained_vs_lin_trained``;
      ``agree_trained_vs_kernel``, ``dist_trained_vs_kernel``; ``kernel_relative_change``,
      ``kernel_alignment`` (train x train eNTK, init vs end); ``weight_change_adapters``
      (``||a - a0|| / ||a0||``), ``weight_change_merged`` (over all base weights),
      ``weight_change_adapted`` (over the adapted leaves only); ``linearization_error_end``
      and ``linearization_error`` (list over ``checkpoints``).

    Raises:
      ConfigError: on an unknown ``linearization`` or ``kernel_solver``.
    """
    from lora_jax import lora
    from lora_jax import params as params_lib

    linearization = _member(Linearization, "linearization", linearization)
    kernel_solver = _member(KernelSolver, "kernel_solver", kernel_solver)
    f, _, info = lora_kernel_model(output_fn, params, adapters0, lora_config)
    if linearization == Linearization.ADAPTERS:
        f_lin = linearize(f, adapters0)
    else:
        lin_w = lora_linearized_model_fn(output_fn, lora_config)
        f_lin = lambda a, batch: lin_w(a, params, batch)  # noqa: E731
    f_jit, f_lin = jax.jit(f), jax.jit(f_lin)
    out = lambda fn, a, b: batched_outputs(fn, a, b, eval_batch_size)  # noqa: E731
    y_init_test = out(f_jit, adapters0, test)
    y_trained = out(f_jit, adapters, test)
    y_lin_at = out(f_lin, adapters, test)
    report: dict[str, Any] = {
        "acc_init": _accuracy(y_init_test, test),
        "acc_trained": _accuracy(y_trained, test),
        "acc_linearized_at_trained": _accuracy(y_lin_at, test),
    }
    agree = prediction_agreement(y_lin_at, y_trained)
    report["agree_trained_vs_lin"] = agree["argmax_agreement"]
    report["dist_trained_vs_lin"] = agree["relative_distance"]
    report["acc_linearized_trained"] = None
    report["agree_trained_vs_lin_trained"] = report["dist_trained_vs_lin_trained"] = None
    if linearized_adapters is not None:
        y_lt = out(f_lin, linearized_adapters, test)
        agree = prediction_agreement(y_lt, y_trained)
        report["acc_linearized_trained"] = _accuracy(y_lt, test)
        report["agree_trained_vs_lin_trained"] = agree["argmax_agreement"]
        report["dist_trained_vs_lin_trained"] = agree["relative_distance"]

    y_init_train = out(f_jit, adapters0, train)
    y_kernel, k_tt0, kernel_at = _kernel_fit(
        f,
        info,
        adapters0,
        train,
        test,
        y_init_train,
        y_init_test,
        kernel=kernel,
        kernel_solver=kernel_solver,
        diag_reg=diag_reg,
        trace_axes=trace_axes,
        vmap_axes=vmap_axes,
        implementation=implementation,
        kernel_batch_size=kernel_batch_size,
        cache_dir=cache_dir,
        progress=progress,
        mesh=mesh,
        data_axis=data_axis,
        fsdp_axis=fsdp_axis,
    )
    k_tt1 = kernel_at(adapters)
    agree = prediction_agreement(y_kernel, y_trained)
    report["acc_kernel"] = _accuracy(y_kernel, test)
    report["agree_trained_vs_kernel"] = agree["argmax_agreement"]
    report["dist_trained_vs_kernel"] = agree["relative_distance"]
    dist = kernel_distance(k_tt0, k_tt1)
    report["kernel_relative_change"] = dist["relative_change"]
    report["kernel_alignment"] = dist["alignment"]

    report["weight_change_adapters"] = relative_weight_change(adapters, adapters0)
    merged0 = lora.apply(params, adapters0, lora_config)
    merged1 = lora.apply(params, adapters, lora_config)
    report["weight_change_merged"] = relative_weight_change(merged1, merged0)
    flat0, flat1 = params_lib.flatten(merged0), params_lib.flatten(merged1)
    flat_base = params_lib.flatten(params)
    adapted = [p for p in flat1 if flat_base.get(p) is not flat1[p]]
    report["weight_change_adapted"] = (
        relative_weight_change([flat1[p] for p in adapted], [flat0[p] for p in adapted])
        if adapted
        else None
    )
    errors = []
    for a in [adapters, *checkpoints]:
        y = out(f_jit, a, test)
        num, den = np.linalg.norm(y - out(f_lin, a, test)), np.linalg.norm(y - y_init_test)
        errors.append(_safe_ratio(float(num), float(den)))
    err = np.asarray(errors)
    report["linearization_error_end"] = float(err[0])
    report["linearization_error"] = [float(e) for e in err[1:]]
    return report
