"""Kernel predictors with the empirical NTK: squared error, cross-entropy flow, logistic, SVM.

All take kernels in neural-tangents' layout, either full (``k_train_train`` ``[N, N, K, K]``,
``k_test_train`` ``[M, N, K, K]``, from ``trace_axes=()``) or traced (``[N, N]`` / ``[M, N]``,
read as ``Theta (x) I_K``), and return predictions ``[M, K]`` on the test set (and ``[N, K]``
on the training set) in a fixed NamedTuple.

One regulariser name, ``diag_reg``, as in neural-tangents: a ridge term added to the diagonal
of the kernel system each solver factors. Its scale differs with the objective (each solver's
docstring says how): :func:`mse_predict` adds ``diag_reg`` (by default times the mean kernel
trace, nt's ``diag_reg_absolute_scale=False``) to ``Theta``; :func:`kernel_logistic_regression`
adds it to the Newton system of ``mean_n CE + diag_reg/2 <alpha, Theta alpha>`` (absolute);
:func:`kernel_svm` minimizes ``sum_n hinge + diag_reg/2 ||w||^2``, i.e. the box constraint
``C = 1 / diag_reg`` of the SVM dual.

Kernels need not be symmetric: row = the point predicted, column = the training example
that moves it (``K(x1, x2)`` of :func:`ntk.empirical_ntk_fn`). Adam's A-SignGD kernel
(:class:`ntk.Kernel`) is not; :func:`mse_predict` and :func:`kernel_logistic_regression`
take ``kernel=Kernel.ASIGNGD`` to use general solves instead of symmetric ones,
:func:`function_space_gd` and :func:`ce_gradient_flow` integrate ``df/dt = -K grad L`` for any
kernel as they are, and :func:`ntk.asymmetric.asymmetric_ls` is LM-Kernel-FT's asymmetric
least squares. :func:`kernel_svm` needs a symmetric kernel.

Time and learning-rate units follow ``lora_jax.losses`` (losses are *means over examples*
and sums over the K outputs): ``t`` counts full-batch gradient steps of size
``learning_rate``, so for the linearized model trained by plain gradient descent,
``f_t = f_0 - learning_rate * sum_s Theta grad_f L(f_s)``. (``nt.predict`` normalizes the
squared error by N*K instead; :func:`mse_predict` converts.)

References:
  Jacot, Gabriel, Hongler, "Neural Tangent Kernel", arXiv:1806.07572, 2018.
  Lee et al., "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient
  Descent", arXiv:1902.06720, 2019.
  Malladi et al., "A Kernel-Based View of Language Model Fine-Tuning", arXiv:2210.05643, 2023.
  Hsieh et al., "A Dual Coordinate Descent Method for Large-scale Linear SVM", ICML 2008.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.losses import Loss
from ntk._compat import nt
from ntk.asymmetric import general_mse_predict
from ntk.optimizer import Kernel, as_kernel

Array = Any
Axes = int | tuple[int, ...]

__all__ = [
    "LogisticFit",
    "Predictions",
    "SvmFit",
    "ce_gradient_flow",
    "function_space_gd",
    "kernel_logistic_regression",
    "kernel_svm",
    "mse_predict",
    "targets",
]


class Predictions(NamedTuple):
    """Kernel-model outputs (leading time axes when ``t`` is an array)."""

    train: Array  # shape=(..., N, K)
    test: Array  # shape=(..., M, K)


class LogisticFit(NamedTuple):
    """Result of :func:`kernel_logistic_regression`."""

    train: np.ndarray  # shape=(N, K): f0 + Theta alpha on the training set.
    test: np.ndarray  # shape=(M, K)
    coef: np.ndarray  # shape=(N, K): alpha, the dual coefficients.
    grad_norm: float  # max-norm of the objective's gradient in f-space at the solution.
    iterations: int


class SvmFit(NamedTuple):
    """Result of :func:`kernel_svm` (one-vs-rest over the K classes)."""

    train: np.ndarray  # shape=(N, K): decision values.
    test: np.ndarray  # shape=(M, K)
    dual_coef: np.ndarray  # shape=(K, N): alpha_i in [0, C = 1 / diag_reg] per class problem.
    signs: np.ndarray  # shape=(K, N): +1 for the class, -1 for the rest.
    max_violation: float  # largest projected-gradient (KKT) violation left.


def _num_outputs(k: Array, *candidates: Array | None) -> int:
    if k.ndim == 4:
        return k.shape[-1]
    for c in candidates:
        if c is not None and np.ndim(c) == 2:
            return np.shape(c)[-1]
    raise ConfigError(
        "Cannot infer K from a traced [N, N] kernel and integer labels: pass one-hot targets "
        "[N, K] or fx_train_0 [N, K]."
    )


def targets(y: Array, num_outputs: int) -> np.ndarray:
    """``[N, K]`` targets from integer labels ``[N]`` (one-hot) or from ``[N, K]`` as is."""
    y = np.asarray(y)
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"1-D targets must be integer labels; got dtype {y.dtype}.")
        return np.eye(num_outputs)[y]
    if y.ndim != 2 or y.shape[1] != num_outputs:
        raise ConfigError(f"Targets must be labels [N] or [N, {num_outputs}]; got {y.shape}.")
    return y


def _check_kernels(k_train_train: Array, k_test_train: Array | None) -> tuple[int, bool]:
    full = k_train_train.ndim == 4
    if k_train_train.ndim not in (2, 4) or k_train_train.shape[0] != k_train_train.shape[1]:
        raise ConfigError(
            f"k_train_train must be [N, N] (traced) or [N, N, K, K]; got {k_train_train.shape}."
        )
    if k_test_train is not None and (
        k_test_train.ndim != k_train_train.ndim or k_test_train.shape[1] != k_train_train.shape[0]
    ):
        raise ConfigError(
            f"k_test_train {k_test_train.shape} does not match k_train_train "
            f"{k_train_train.shape}: expected [M, N] or [M, N, K, K] with the same N."
        )
    return k_train_train.shape[0], full


def _matrix(k: np.ndarray, num_outputs: int) -> np.ndarray:
    """``[N1*K, N2*K]`` matrix with rows (n, k) from a full or traced kernel."""
    k = np.asarray(k, np.float64)
    if k.ndim == 2:
        return np.kron(k, np.eye(num_outputs))
    n1, n2, k1, k2 = k.shape
    return k.transpose(0, 2, 1, 3).reshape(n1 * k1, n2 * k2)  # (N1 K, N2 K)


def _start(k_train_train, y_train, k_test_train, fx_train_0, fx_test_0):
    """One-hot targets and initial outputs broadcast to ``[N, K]`` / ``[M, K]``, kernel dtype."""
    num_k = _num_outputs(k_train_train, y_train, fx_train_0)
    dtype = jnp.asarray(k_train_train).dtype
    y = jnp.asarray(targets(y_train, num_k), dtype)
    f_train = jnp.broadcast_to(jnp.asarray(fx_train_0, dtype), y.shape)
    f_test = jnp.broadcast_to(jnp.asarray(fx_test_0, dtype), (k_test_train.shape[0], num_k))
    return y, f_train, f_test


def mse_predict(
    k_train_train: Array,
    y_train: Array,
    k_test_train: Array,
    fx_train_0: Array = 0.0,
    fx_test_0: Array = 0.0,
    *,
    t: Array | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
    kernel: Kernel | str = Kernel.SGD,
) -> Predictions:
    """Gradient-flow predictions on squared error, in closed form (``nt.predict``).

    Wraps ``nt.predict.gradient_descent_mse``. The loss is ``lora_jax``'s squared error
    ``mean_n 0.5 ||f(x_n) - y_n||^2``, so on the training set
    ``f_t = y + expm(-learning_rate * t * Theta / N) (f_0 - y)`` and at ``t=None`` (infinity)
    the test predictions are kernel regression
    ``f0_test + K_te,tr (K_tr,tr + diag_reg * s * I)^-1 (y - f0_train)`` (``s``: the mean
    kernel trace, or 1 with ``diag_reg_absolute_scale``).

    Args:
      k_train_train: ``[N, N, K, K]`` (``trace_axes=()``) or ``[N, N]`` (``trace_axes=(-1,)``).
      y_train: integer labels ``[N]`` (one-hot targets) or targets ``[N, K]``.
      k_test_train: ``[M, N, K, K]`` or ``[M, N]``.
      fx_train_0: outputs at initialization ``[N, K]`` (0: a zero-initialized readout).
      fx_test_0: ``[M, K]`` (or 0).
      t: training time in steps (scalar or array); None: t = infinity (Cholesky solve).
      learning_rate: step size of the gradient descent being modelled.
      diag_reg: diagonal regularizer; ``diag_reg_absolute_scale=False`` scales it by the mean
        kernel trace as in neural-tangents.
      diag_reg_absolute_scale: see ``diag_reg``.
      trace_axes: must agree with the kernel: ``()`` for full, ``(-1,)`` for traced kernels.
      kernel: which kernel (:class:`ntk.Kernel`) the arrays hold. A symmetric one (SGD,
        SIGNGD) goes to ``nt.predict`` (Cholesky / eigh); ``ASIGNGD`` (not symmetric) to
        :func:`ntk.asymmetric.general_mse_predict`: the same flow and regulariser solved in
        float64 numpy with matrix exponentials and, at ``t=None``, an LU solve.

    Returns:
      ``Predictions(train [..., N, K], test [..., M, K])``.
    """
    n, full = _check_kernels(k_train_train, k_test_train)
    trace_axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
    if full == (trace_axes != ()):
        raise ConfigError(
            f"trace_axes={trace_axes} does not match a kernel of shape {k_train_train.shape}: "
            "use trace_axes=() with [N, N, K, K] kernels and (-1,) with [N, N] ones."
        )
    y, fx_train_0, fx_test_0 = _start(k_train_train, y_train, k_test_train, fx_train_0, fx_test_0)
    if not as_kernel(kernel).symmetric:
        train, test = general_mse_predict(
            k_train_train,
            np.asarray(y, np.float64),
            k_test_train,
            np.asarray(fx_train_0, np.float64),
            np.asarray(fx_test_0, np.float64),
            t=t,
            learning_rate=learning_rate,
            diag_reg=diag_reg,
            diag_reg_absolute_scale=diag_reg_absolute_scale,
        )
        return Predictions(train, test)
    # nt's loss is 0.5 * mean over all N*K entries; ours is mean over N, sum over K.
    predict_fn = nt.predict.gradient_descent_mse(
        jnp.asarray(k_train_train),
        y,
        learning_rate=learning_rate * y.shape[-1],
        diag_reg=diag_reg,
        diag_reg_absolute_scale=diag_reg_absolute_scale,
        trace_axes=trace_axes,
    )
    train, test = predict_fn(t, fx_train_0, fx_test_0, jnp.asarray(k_test_train))
    return Predictions(train, test)


def _ce_grad(f: jax.Array, y: jax.Array) -> jax.Array:
    """Gradient of mean_n CE(f_n, y_n) with respect to f [N, K]."""
    return (jax.nn.softmax(f, axis=-1) - y) / f.shape[0]


def _mse_grad(f: jax.Array, y: jax.Array) -> jax.Array:
    return (f - y) / f.shape[0]


def _apply(k: jax.Array, g: jax.Array) -> jax.Array:
    """Theta applied to a [N, K] function-space vector: [M, K]."""
    if k.ndim == 2:
        return k @ g
    return jnp.einsum("mnkl,nl->mk", k, g)


def ce_gradient_flow(
    k_train_train: Array,
    y_train: Array,
    k_test_train: Array,
    fx_train_0: Array = 0.0,
    fx_test_0: Array = 0.0,
    *,
    t: float,
    learning_rate: float = 1.0,
    trace_axes: Axes = (-1,),
) -> Predictions:
    """Function-space gradient flow on cross-entropy: the linearized model trained to time t.

    Solves ``df/dt = -learning_rate * Theta grad_f L(f)`` with ``L = mean_n CE(f_n, y_n)``
    (``lora_jax.losses.cross_entropy``) by ``nt.predict.gradient_descent`` (an adaptive
    Dormand-Prince ODE solver, ``jax.experimental.ode``). There is no closed form and, on
    separable data, no finite limit: pass a finite ``t`` (steps).

    Args: as :func:`mse_predict`; ``y_train`` are labels ``[N]`` or probabilities ``[N, K]``.

    Returns:
      ``Predictions(train [N, K], test [M, K])`` at time ``t``.
    """
    _check_kernels(k_train_train, k_test_train)
    y, fx_train_0, fx_test_0 = _start(k_train_train, y_train, k_test_train, fx_train_0, fx_test_0)

    def loss(fx, y_hat):
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(fx, axis=-1) * y_hat, axis=-1))

    predict_fn = nt.predict.gradient_descent(
        loss, jnp.asarray(k_train_train), y, learning_rate=learning_rate, trace_axes=trace_axes
    )
    train, test = predict_fn(t, fx_train_0, fx_test_0, jnp.asarray(k_test_train))
    return Predictions(train, test)


def function_space_gd(
    k_train_train: Array,
    y_train: Array,
    k_test_train: Array,
    fx_train_0: Array = 0.0,
    fx_test_0: Array = 0.0,
    *,
    steps: int,
    learning_rate: float = 1.0,
    loss: Loss | str = Loss.CE,
) -> Predictions:
    """Discrete full-batch gradient descent in function space (exact for a linear model).

    ``f_{s+1} = f_s - learning_rate * Theta grad_f L(f_s)`` for ``steps`` steps, on train and
    test alike. For a model linear in its parameters trained by full-batch SGD (no momentum)
    with the same learning rate and loss this is exactly its trajectory.

    Args:
      loss: a :class:`lora_jax.losses.Loss` (or its value, ``'ce'`` / ``'mse'``), with
        ``lora_jax.losses`` conventions.
      Others: as :func:`mse_predict` (the kernel layout decides full vs traced).

    Raises:
      ConfigError: on an unknown ``loss`` or kernels of mismatched shapes.
    """
    _check_kernels(k_train_train, k_test_train)
    try:
        loss = Loss(loss)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in Loss)
        raise ConfigError(f"loss={loss!r} is not a Loss; pass one of {allowed}.") from None
    grad = {Loss.CE: _ce_grad, Loss.MSE: _mse_grad}[loss]
    ktt, kst = jnp.asarray(k_train_train), jnp.asarray(k_test_train)
    y, f_tr, f_te = _start(ktt, y_train, kst, fx_train_0, fx_test_0)

    def step(carry, _):
        f_tr, f_te = carry
        g = grad(f_tr, y)
        return (f_tr - learning_rate * _apply(ktt, g), f_te - learning_rate * _apply(kst, g)), None

    (f_tr, f_te), _ = jax.lax.scan(step, (f_tr, f_te), None, length=steps)
    return Predictions(f_tr, f_te)


def kernel_logistic_regression(
    k_train_train: Array,
    y_train: Array,
    k_test_train: Array,
    fx_train_0: Array = 0.0,
    fx_test_0: Array = 0.0,
    *,
    diag_reg: float = 1e-3,
    max_iter: int = 100,
    tol: float = 1e-10,
    kernel: Kernel | str = Kernel.SGD,
) -> LogisticFit:
    """Multiclass kernel logistic regression with the (full or traced) NTK, by Newton's method.

    Minimizes over alpha ``[N, K]`` (float64, numpy)::

        mean_n CE(f_n, y_n) + diag_reg/2 * <alpha, Theta alpha>,   f = f0 + Theta alpha

    whose optimality condition is ``(softmax(f) - y) / N + diag_reg * alpha = 0``. Newton steps
    ``(W Theta + diag_reg I) delta = -(g + diag_reg alpha)`` (W: the softmax Hessian / N) with
    backtracking line search.

    With an asymmetric kernel (``kernel=Kernel.ASIGNGD``) ``<alpha, Theta alpha>`` is no
    norm and there is no objective; the same condition is the fixed point of the
    function-space flow with weight decay, ``df/dt = -Theta (grad_f L + diag_reg alpha)``, and
    it is solved by the same Newton steps (a general solve) with the line search on the
    squared residual instead of the objective.

    Args:
      diag_reg: ridge strength (> 0), added to the diagonal of the Newton system as is (no
        trace scaling). The loss is a mean over the N examples, so with the squared error in
        place of CE this ridge would be :func:`mse_predict`'s ``diag_reg = N * diag_reg``
        with ``diag_reg_absolute_scale=True``.
      max_iter: Newton iterations.
      tol: stop when the max-norm of ``g + diag_reg alpha`` is below it.
      kernel: which kernel (:class:`ntk.Kernel`) the arrays hold (see above).
      Others: as :func:`mse_predict`.

    Returns:
      ``LogisticFit(train, test, coef, grad_norm, iterations)``.
    """
    if diag_reg <= 0:
        raise ConfigError(
            f"diag_reg must be > 0, got {diag_reg}: the unregularized logistic fit has no "
            "finite solution on separable data."
        )
    symmetric = as_kernel(kernel).symmetric
    n, _ = _check_kernels(k_train_train, k_test_train)
    num_k = _num_outputs(k_train_train, y_train, fx_train_0)
    y = targets(y_train, num_k).astype(np.float64)
    ktt = _matrix(k_train_train, num_k)  # (N K, N K)
    kst = _matrix(k_test_train, num_k)  # (M K, N K)
    f0 = np.broadcast_to(np.asarray(fx_train_0, np.float64), y.shape).reshape(-1)
    f0_test = np.broadcast_to(np.asarray(fx_test_0, np.float64), (kst.shape[0] // num_k, num_k))

    def parts(alpha):
        f = (f0 + ktt @ alpha).reshape(n, num_k)
        f = f - f.max(axis=1, keepdims=True)
        logp = f - np.log(np.exp(f).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        if not symmetric:  # no objective: the squared residual of the condition
            return float(np.sum((((p - y) / n).reshape(-1) + diag_reg * alpha) ** 2)), p
        obj = -np.sum(y * logp) / n + 0.5 * diag_reg * alpha @ ktt @ alpha
        return obj, p

    alpha = np.zeros(n * num_k)
    obj, p = parts(alpha)
    it, resid = 0, np.inf
    for it in range(1, max_iter + 1):  # noqa: B007
        r = ((p - y) / n).reshape(-1) + diag_reg * alpha
        resid = float(np.abs(r).max())
        if resid < tol:
            break
        w = np.zeros((n * num_k, n * num_k))
        for i in range(n):
            s = slice(i * num_k, (i + 1) * num_k)
            w[s, s] = (np.diag(p[i]) - np.outer(p[i], p[i])) / n
        delta = np.linalg.solve(w @ ktt + diag_reg * np.eye(n * num_k), -r)
        step = 1.0
        while step > 1e-10:
            new_obj, new_p = parts(alpha + step * delta)
            if new_obj <= obj + 1e-12 * abs(obj):
                break
            step *= 0.5
        alpha, obj, p = alpha + step * delta, new_obj, new_p
    r = ((p - y) / n).reshape(-1) + diag_reg * alpha
    resid = float(np.abs(r).max())
    train = (f0 + ktt @ alpha).reshape(n, num_k)
    test = f0_test + (kst @ alpha).reshape(-1, num_k)
    return LogisticFit(train, test, alpha.reshape(n, num_k), resid, it)


def kernel_svm(
    k_train_train: Array,
    y_train: Array,
    k_test_train: Array,
    *,
    diag_reg: float = 1.0,
    num_classes: int | None = None,
    fit_intercept: bool = True,
    tol: float = 1e-6,
    max_iter: int = 10_000,
) -> SvmFit:
    """Kernel SVM (hinge loss), one-vs-rest over K classes, by dual coordinate ascent.

    For each class k it minimizes ``sum_n hinge(s_n f_k(x_n)) + diag_reg/2 ||w||^2`` through its
    dual ``max_alpha sum alpha - 1/2 alpha^T Q alpha``, ``0 <= alpha <= C = 1 / diag_reg``,
    ``Q_ij = s_i s_j K_ij`` with ``s = +1`` for class k and -1 otherwise;
    ``K`` is the class's own output kernel ``Theta[:, :, k, k]`` for a full kernel, or the
    traced kernel. With ``fit_intercept`` the kernel is augmented by +1 (a regularized bias,
    as in LIBLINEAR). Decision values ``f_k(x) = sum_i alpha_i s_i K(x, x_i)``.

    Args:
      k_train_train: ``[N, N]`` or ``[N, N, K, K]``.
      y_train: integer labels ``[N]``.
      k_test_train: ``[M, N]`` or ``[M, N, K, K]``.
      diag_reg: ridge strength (> 0) on a *sum* of hinge losses (LIBLINEAR's convention, not
        the mean of the other solvers); the dual's box constraint is ``C = 1 / diag_reg``. The
        hinge dual has no diagonal term: the name is shared with the other solvers for one
        vocabulary, the meaning is the SVM's ``1 / C``.
      num_classes: K (default: from the full kernel, else ``max(y) + 1``).
      fit_intercept: augment the kernel with a constant.
      tol: stop when the largest projected gradient is below it.
      max_iter: maximum sweeps over the data.

    Returns:
      ``SvmFit(train [N, K], test [M, K], dual_coef [K, N], signs [K, N], max_violation)``.
    """
    if diag_reg <= 0:
        raise ConfigError(
            f"diag_reg must be > 0, got {diag_reg}: the box constraint is C = 1 / diag_reg; "
            "for a hard margin pass a small diag_reg (e.g. 1e-6)."
        )
    c = 1.0 / diag_reg
    n, full = _check_kernels(k_train_train, k_test_train)
    labels = np.asarray(y_train)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"kernel_svm needs integer labels [N]; got {labels.dtype} {labels.shape}."
        )
    num_k = num_classes or (k_train_train.shape[-1] if full else int(labels.max()) + 1)
    ktt_all = np.asarray(k_train_train, np.float64)
    kst_all = np.asarray(k_test_train, np.float64)
    train = np.zeros((n, num_k))
    test = np.zeros((kst_all.shape[0], num_k))
    alphas, signs = np.zeros((num_k, n)), np.zeros((num_k, n))
    worst = 0.0
    for k in range(num_k):
        ktt = ktt_all[:, :, k, k] if full else ktt_all
        kst = kst_all[:, :, k, k] if full else kst_all
        if fit_intercept:
            ktt, kst = ktt + 1.0, kst + 1.0
        s = np.where(labels == k, 1.0, -1.0)
        q = s[:, None] * s[None, :] * ktt
        alpha, viol = _dual_cd(q, c, tol, max_iter)
        worst = max(worst, viol)
        alphas[k], signs[k] = alpha, s
        train[:, k] = ktt @ (alpha * s)
        test[:, k] = kst @ (alpha * s)
    return SvmFit(train, test, alphas, signs, worst)


def _dual_cd(q: np.ndarray, c: float, tol: float, max_iter: int) -> tuple[np.ndarray, float]:
    """Dual coordinate ascent for ``min 1/2 a^T Q a - sum a``, ``0 <= a <= c``."""
    n = q.shape[0]
    alpha = np.zeros(n)
    grad = -np.ones(n)  # Q alpha - 1
    diag = np.maximum(np.diag(q), 1e-12)
    viol = np.inf
    for _ in range(max_iter):
        viol = 0.0
        for i in range(n):
            g = grad[i]
            pg = min(g, 0.0) if alpha[i] <= 0 else max(g, 0.0) if alpha[i] >= c else g
            viol = max(viol, abs(pg))
            if pg != 0.0:
                new = min(max(alpha[i] - g / diag[i], 0.0), c)
                grad += q[:, i] * (new - alpha[i])
                alpha[i] = new
        if viol < tol:
            break
    g = q @ alpha - 1.0
    pg = np.where(alpha <= 0, np.minimum(g, 0.0), np.where(alpha >= c, np.maximum(g, 0.0), g))
    return alpha, float(np.abs(pg).max())
