"""Solvers for asymmetric kernels (Adam's A-SignGD kernel, :class:`ntk.Kernel`).

``K(x, x') = <grad f(x), sign(grad f(x'))>`` is not symmetric, so the symmetric machinery of
kernel regression (Cholesky, eigendecompositions: ``nt.predict.gradient_descent_mse``) does
not apply. What does:

* the function-space gradient flow ``df/dt = -learning_rate * K grad_f L(f)`` is defined for
  any K (row: the point predicted, column: the training row that moves it), and for squared
  error it is linear: :func:`general_mse_predict` solves it with matrix exponentials and, at
  t = infinity, with a general (LU) linear solve. This is :func:`ntk.mse_predict` with
  ``kernel=Kernel.ASIGNGD``; :func:`ntk.function_space_gd` and :func:`ntk.ce_gradient_flow`
  take any kernel as they are, and :func:`ntk.kernel_logistic_regression` with
  ``kernel=Kernel.ASIGNGD`` solves its stationarity conditions without an objective.
* :func:`asymmetric_ls`: the least-squares classifier for asymmetric kernels of He et al.
  (AsK-LS), which LM-Kernel-FT runs for its A-SignGD kernel (``--kernel_solver asym``): two
  dual vectors, one per side of the kernel, from one general linear system.

References:
  Malladi et al., "A Kernel-Based View of Language Model Fine-Tuning", arXiv:2210.05643, 2023.
  He, He, Shi, Huang, Suykens, "Learning with Asymmetric Kernels: Least Squares and Feature
  Interpretation", arXiv:2202.01397, 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from lora_jax.errors import ConfigError

Array = Any

__all__ = ["AsymmetricFit", "asymmetric_ls", "general_mse_predict"]


class AsymmetricFit(NamedTuple):
    """Result of :func:`asymmetric_ls` (one-vs-rest over the K classes)."""

    train: np.ndarray  # shape=(N, K): decision values on the training set.
    test: np.ndarray  # shape=(M, K)
    alpha: np.ndarray  # shape=(K, N): duals of the constraints on the x2 side (sign side).
    beta: np.ndarray  # shape=(K, N): duals of the constraints on the x1 side.
    signs: np.ndarray  # shape=(K, N): +1 for the class, -1 for the rest.


def _as_matrix(k: Array, num_outputs: int) -> tuple[np.ndarray, bool]:
    """``([N1 K, N2 K], full)`` from a full kernel (rows (n, k)), or ``([N1, N2], False)``
    from a traced one (read as ``Theta (x) I_K``, applied per output column)."""
    k = np.asarray(k, np.float64)
    if k.ndim == 2:
        return k, False
    n1, n2, k1, k2 = k.shape
    return k.transpose(0, 2, 1, 3).reshape(n1 * k1, n2 * k2), True  # (N1 K, N2 K)


def _integral(a: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """``(expm(-t A), int_0^t expm(-s A) ds)``, exact for singular ``A`` too: both are blocks
    of the exponential of the augmented matrix ``[[-A, I], [0, 0]] t``."""
    n = a.shape[0]
    aug = np.zeros((2 * n, 2 * n))
    aug[:n, :n] = -a
    aug[:n, n:] = np.eye(n)
    e = scipy.linalg.expm(aug * t)
    return e[:n, :n], e[:n, n:]


def general_mse_predict(
    k_train_train: Array,
    y: np.ndarray,
    k_test_train: Array,
    fx_train_0: np.ndarray,
    fx_test_0: np.ndarray,
    *,
    t: Array | None,
    learning_rate: float,
    diag_reg: float,
    diag_reg_absolute_scale: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Squared-error gradient flow with any (e.g. asymmetric) kernel, float64 numpy.

    ``df/dt = -learning_rate * A (f - y) / N`` on the training set with
    ``A = Theta + reg * I`` (``reg = diag_reg``, times the mean kernel diagonal unless
    ``diag_reg_absolute_scale``), and the test outputs driven by the same residuals through
    ``Theta_te,tr``. With ``c = learning_rate / N`` and ``r_0 = f_0 - y``:
    ``f_t = y + expm(-c t A) r_0`` and ``f_test_t = f_test_0 - c Theta_te,tr
    int_0^t expm(-c s A) ds r_0``; at ``t=None`` (infinity; A must be invertible)
    ``f_test = f_test_0 + Theta_te,tr A^-1 (y - f_0)`` by an LU solve, and ``f = y`` on the
    training set (the limit of the flow, as in ``nt.predict``).

    Args: as :func:`ntk.mse_predict`, with ``y``, ``fx_train_0`` ``[N, K]`` and ``fx_test_0``
    ``[M, K]`` given as arrays.

    Returns:
      ``(train [..., N, K], test [..., M, K])``, leading axes those of ``t``.
    """
    n, num_k = y.shape
    ktt, full = _as_matrix(k_train_train, num_k)
    kst, _ = _as_matrix(k_test_train, num_k)
    m = kst.shape[0] // (num_k if full else 1)
    scale = 1.0 if diag_reg_absolute_scale else float(np.mean(np.diag(ktt)))
    a = ktt + diag_reg * scale * np.eye(ktt.shape[0])
    # Columns: (N K, 1) for a full kernel, (N, K) for a traced one (Theta (x) I_K).
    shape = (-1, 1) if full else (n, num_k)
    r0 = (fx_train_0 - y).reshape(shape)

    def back(v, rows):
        return v.reshape(rows, num_k)

    if t is None:
        coef = np.linalg.solve(a, -r0)  # A^-1 (y - f_0), general LU
        return y.copy(), back(fx_test_0.reshape((-1, 1) if full else (m, num_k)) + kst @ coef, m)
    c = learning_rate / n
    trains, tests = [], []
    for ti in np.ravel(np.asarray(t, np.float64)):
        e, integral = _integral(c * a, float(ti))
        trains.append(back(y.reshape(shape) + e @ r0, n))
        test = fx_test_0.reshape((-1, 1) if full else (m, num_k)) - c * kst @ (integral @ r0)
        tests.append(back(test, m))
    lead = np.shape(t)
    return np.stack(trains).reshape(*lead, n, num_k), np.stack(tests).reshape(*lead, m, num_k)


def asymmetric_ls(
    k_train_train: Array,
    y_train: Array,
    k_test_train: Array,
    k_train_test: Array,
    *,
    diag_reg: float = 1.0,
    weight: float = 0.5,
    num_classes: int | None = None,
) -> AsymmetricFit:
    """Least squares with an asymmetric kernel (AsK-LS), one-vs-rest over the K classes.

    For a kernel ``K(x, x') = <phi_1(x), phi_2(x')>`` (A-SignGD: ``phi_1 = grad f``,
    ``phi_2 = sign grad f``) AsK-LS keeps one weight vector per feature map and solves, per
    class with targets ``s_n = +-1``::

        min_{w, v}  <w, v> + 1/(2 diag_reg) sum_n (e_n^2 + r_n^2)
        s.t.  s_n <w, phi_1(x_n)> = 1 - e_n,   s_n <v, phi_2(x_n)> = 1 - r_n

    whose dual is one general linear system in ``(alpha, beta)``::

        [[diag_reg I, H], [H^T, diag_reg I]] [alpha; beta] = 1,   H = diag(s) K_tr,tr diag(s)

    with decision values ``f_1(x) = sum_n beta_n s_n K(x, x_n)`` (``k_test_train``: the
    A-SignGD direction, training gradients signed) and ``f_2(x) = sum_n alpha_n s_n K(x_n, x)``
    (``k_train_test``), combined as ``weight * f_1 + (1 - weight) * f_2`` (LM-Kernel-FT's
    ``kernel_lambda``; it runs one binary problem on a single logit, here each class is one
    problem). For a symmetric kernel ``alpha = beta`` and it is the LS-SVM without bias.

    Args:
      k_train_train: ``K(x_i, x_j)`` ``[N, N]`` (traced) or ``[N, N, K, K]`` (each class k
        uses ``Theta[:, :, k, k]``).
      y_train: integer labels ``[N]``.
      k_test_train: ``K(test, train)`` ``[M, N]`` or ``[M, N, K, K]``.
      k_train_test: ``K(train, test)`` ``[N, M]`` or ``[N, M, K, K]`` (for a symmetric
        kernel, the transpose of ``k_test_train``).
      diag_reg: ``1 / gamma`` of AsK-LS (> 0, absolute): the ridge on the diagonal of the
        dual system (LM-Kernel-FT's default gamma = 1 is ``diag_reg=1``).
      weight: the share of ``f_1`` in the decision values, in [0, 1].
      num_classes: K (default: from the full kernel, else ``max(y) + 1``).

    Returns:
      ``AsymmetricFit(train [N, K], test [M, K], alpha [K, N], beta [K, N], signs [K, N])``;
      the predicted class is the argmax over K.

    Raises:
      ConfigError: on ``diag_reg <= 0``, ``weight`` outside [0, 1], non-integer labels or
        kernels of mismatched shapes.
    """
    if diag_reg <= 0:
        raise ConfigError(f"diag_reg must be > 0 (it is 1 / gamma of AsK-LS), got {diag_reg}.")
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"weight must be in [0, 1] (the share of K(test, train)), got {weight}.")
    ktt_all = np.asarray(k_train_train, np.float64)
    kst_all = np.asarray(k_test_train, np.float64)
    kts_all = np.asarray(k_train_test, np.float64)
    labels = np.asarray(y_train)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"asymmetric_ls needs integer labels [N]; got {labels.dtype} {labels.shape}."
        )
    n = labels.shape[0]
    full = ktt_all.ndim == 4
    m = kst_all.shape[0]
    if (
        ktt_all.shape[:2] != (n, n)
        or kst_all.ndim != ktt_all.ndim
        or kst_all.shape[1] != n
        or kts_all.shape[:2] != (n, m)
    ):
        raise ConfigError(
            f"asymmetric_ls: k_train_train {ktt_all.shape}, k_test_train {kst_all.shape} and "
            f"k_train_test {kts_all.shape} do not fit {n} labels: expected [N, N], [M, N], "
            "[N, M] (or each with trailing [K, K])."
        )
    num_k = num_classes or (ktt_all.shape[-1] if full else int(labels.max()) + 1)
    train, test = np.zeros((n, num_k)), np.zeros((m, num_k))
    alphas, betas, signs = (np.zeros((num_k, n)) for _ in range(3))
    eye = diag_reg * np.eye(n)
    for k in range(num_k):
        ktt = ktt_all[:, :, k, k] if full else ktt_all
        kst = kst_all[:, :, k, k] if full else kst_all
        kts = kts_all[:, :, k, k] if full else kts_all
        s = np.where(labels == k, 1.0, -1.0)
        h = s[:, None] * ktt * s[None, :]
        system = np.block([[eye, h], [h.T, eye]])
        sol = np.linalg.solve(system, np.ones(2 * n))
        alpha, beta = sol[:n], sol[n:]
        f1_train, f1_test = ktt @ (beta * s), kst @ (beta * s)
        f2_train, f2_test = ktt.T @ (alpha * s), kts.T @ (alpha * s)
        train[:, k] = weight * f1_train + (1 - weight) * f2_train
        test[:, k] = weight * f1_test + (1 - weight) * f2_test
        alphas[k], betas[k], signs[k] = alpha, beta, s
    return AsymmetricFit(train, test, alphas, betas, signs)
