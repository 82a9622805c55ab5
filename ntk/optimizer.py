"""Which optimizer's kernel: the SGD eNTK, the SignGD kernel and the asymmetric A-SignGD kernel.

A model trained by a first-order optimizer moves its outputs, to first order in the step, by
``f(x; theta - eta u) - f(x; theta) = -eta <grad f(x), u>``. For SGD the update ``u`` of one
training example x' with loss derivative chi is ``chi grad f(x')``, so the outputs move along
the eNTK ``<grad f(x), grad f(x')>``. For SignGD it is ``sign(chi) sign(grad f(x'))``: the
outputs move along ``<grad f(x), sign(grad f(x'))>``, a kernel that is *not symmetric*.
Malladi et al. (2023) show that early in training Adam behaves like SignGD (its update is
``m / sqrt(v)`` with ``v ~ m^2`` after few steps) and that prompt-based fine-tuning with Adam
follows this A-SignGD kernel where the SGD eNTK does not.

The kernels below follow their definitions and their code (LM-Kernel-FT,
``--kernel_formula sgd | signgd | asymmetric_signgd``), with neural-tangents' argument order
``kernel(x1, x2)`` (x1: the point predicted, e.g. a test row; x2: the training row that moves
it), per output pair ``(k, l)``: ``Theta[a, b, k, l] = <phi_1(grad f_k(x1_a)),
phi_2(grad f_l(x2_b))>`` summed over the differentiated parameters.

References:
  Malladi, Wettig, Yu, Chen, Arora, "A Kernel-Based View of Language Model Fine-Tuning",
  ICML 2023, arXiv:2210.05643 (code: github.com/princeton-nlp/LM-Kernel-FT).
  He, He, Shi, Huang, Suykens, "Learning with Asymmetric Kernels: Least Squares and Feature
  Interpretation", arXiv:2202.01397, 2022 (the asymmetric least-squares solver).
"""

from __future__ import annotations

import enum
from typing import Any

from lora_jax.errors import ConfigError

__all__ = ["Kernel", "as_kernel"]


class Kernel(enum.StrEnum):
    """Which optimizer's kernel :func:`ntk.empirical_ntk_fn` computes and the solvers expect.

    Attributes:
      SGD: (``'sgd'``, default) the empirical NTK ``<grad f(x1), grad f(x2)>``: the kernel of
        (full-batch) gradient descent; symmetric positive semi-definite. Computed by any
        :class:`ntk.NtkImplementation`.
      SIGNGD: (``'signgd'``) ``<sign(grad f(x1)), sign(grad f(x2))>`` (LM-Kernel-FT's
        ``signgd``): symmetric positive semi-definite, a kernel of the signs alone. It is not
        the kernel of SignGD's dynamics (that is A-SIGNGD) but a symmetric stand-in for it
        that the symmetric solvers (Cholesky) accept.
      ASIGNGD: (``'asigngd'``) ``<grad f(x1), sign(grad f(x2))>`` (Malladi et al.'s A-SignGD
        kernel, LM-Kernel-FT's ``asymmetric_signgd``): how a SignGD step on the training row
        x2 moves the output at x1, the kernel Adam follows early in training. Not symmetric
        (``K(x, x') != K(x', x)``), so ``x2=None`` gives the full ``K(x1, x1)``, not a
        mirrored triangle, and its solvers use a general linear solve (``ntk.solvers``, with
        ``kernel=Kernel.ASIGNGD``) instead of Cholesky / eigh.

    SIGNGD and ASIGNGD need per-example gradients (``sign`` is not linear, so no
    NTK-vector-product or structured-derivative trick applies): ``empirical_ntk_fn`` computes
    them with ``implementation=JACOBIAN_CONTRACTION`` and ``vmap_axes=0`` only, with the same
    blocking, memory check, embedding compaction and padding cuts as the SGD kernel. Gradients
    that are exactly zero (embedding rows a batch does not read, padded positions, LoRA's A
    while B = 0) have sign 0, so those exact shortcuts stay exact.
    """

    SGD = "sgd"
    SIGNGD = "signgd"
    ASIGNGD = "asigngd"

    @property
    def signs(self) -> tuple[bool, bool]:
        """Whether the gradients of x1 and of x2 enter through their sign."""
        return {
            Kernel.SGD: (False, False),
            Kernel.SIGNGD: (True, True),
            Kernel.ASIGNGD: (False, True),
        }[self]

    @property
    def symmetric(self) -> bool:
        """Whether ``K(x, x') = K(x', x)``."""
        return self != Kernel.ASIGNGD


def as_kernel(value: Any) -> Kernel:
    """``Kernel(value)`` (a member or its value), or a ConfigError naming the allowed values."""
    try:
        return Kernel(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in Kernel)
        raise ConfigError(f"kernel={value!r} is not a Kernel; pass one of {allowed}.") from None
