"""Small-sample statistics over seeds: t intervals, the paired t test, the sign-flip test.

A rank sweep gives one accuracy per (task, rank, seed); the seeds pair the cells (the same
few-shot split and initialization seed at every rank). With 3-5 seeds, the paired t test is the
one that can reject: the exact sign-flip (permutation) test's smallest two-sided p-value is
``2 / 2**n`` (0.0625 at n = 5, 0.25 at n = 3), so it is reported beside the t test as a check
that does not assume normal differences, not as the verdict.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["PairedTest", "paired_test", "sign_flip_p", "t_interval"]

LEVEL = 0.95  # confidence level of every interval, and 1 - the test level (two-sided 0.05)
_EXACT_MAX_N = 20  # sign-flip test enumerates all 2**n sign vectors up to this n


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student t interval of the mean.

    Args:
      values: ``[n]`` samples (e.g. one accuracy per seed).
      level: confidence level.

    Returns:
      ``(mean, half)``: the interval is ``mean ± half``, ``half = t_{(1+level)/2, n-1} s / √n``
      with ``s`` the sample standard deviation; ``half`` is nan for n = 1.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval of no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    quantile = _scipy_stats.t.ppf(0.5 + level / 2, df=x.size - 1)
    return mean, float(quantile * x.std(ddof=1) / np.sqrt(x.size))


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of the sign-flip (paired permutation) test of mean difference 0.

    Under the null each paired difference is as likely negative as positive, so the p-value is
    the share of the ``2**n`` sign vectors ``s`` with ``|mean(s * d)| >= |mean(d)|`` (exact up to
    n = 20; above, 100,000 random sign vectors from ``numpy.random.default_rng(0)``).
    All-zero differences give 1.

    Args:
      differences: ``[n]`` paired differences.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        raise ValueError("sign_flip_p of no differences")
    if d.size <= _EXACT_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(100_000, d.size))
    observed = abs(d.mean())
    flipped = np.abs(signs @ d) / d.size
    return float(np.mean(flipped >= observed - 1e-12 * max(1.0, observed)))


class PairedTest(NamedTuple):
    """The paired comparison of two columns over the seeds both have.

    Attributes:
      n: number of pairs (seeds).
      mean_a, mean_b: the means of the two columns over those seeds.
      diff: mean of ``a - b``.
      half: half-width of the ``LEVEL`` t interval of ``diff`` (nan for n = 1).
      t: paired t statistic ``diff / (s_d / √n)`` (±inf when every difference is the same
        non-zero value, nan for n = 1 or all differences zero).
      df: degrees of freedom, ``n - 1``.
      p: two-sided p-value of the t test (1 when all differences are zero, nan for n = 1).
      p_sign_flip: two-sided p-value of the exact sign-flip test (`sign_flip_p`).
    """

    n: int
    mean_a: float
    mean_b: float
    diff: float
    half: float
    t: float
    df: int
    p: float
    p_sign_flip: float

    @property
    def within_noise(self) -> bool:
        """Whether the ``LEVEL`` interval of the difference contains 0 (t test p >= 0.05).

        Not rejecting is not proof of equality: read it with ``half``, the size of the
        difference the seeds could have detected.
        """
        return not (self.p < 1 - LEVEL)


def paired_test(a: dict[int, float], b: dict[int, float]) -> PairedTest | None:
    """Paired t test (and sign-flip test) of ``a - b`` over the seeds both have.

    Args:
      a, b: ``{seed: value}``.

    Returns:
      The `PairedTest`, or None when no seed is in both.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    x = np.array([a[s] for s in seeds], np.float64)
    y = np.array([b[s] for s in seeds], np.float64)
    d = x - y
    n = d.size
    diff, half = t_interval(d)
    if n < 2:
        t = p = float("nan")
    else:
        sd = d.std(ddof=1)
        if sd > 1e-12 * max(1.0, abs(diff)):
            t = float(diff / (sd / np.sqrt(n)))
            p = float(2 * _scipy_stats.t.sf(abs(t), df=n - 1))
        elif diff == 0.0:
            t, p = float("nan"), 1.0
        else:
            t, p = float(np.sign(diff) * np.inf), 0.0
    return PairedTest(
        n=n,
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        diff=diff,
        half=half,
        t=t,
        df=n - 1,
        p=p,
        p_sign_flip=sign_flip_p(d),
    )
