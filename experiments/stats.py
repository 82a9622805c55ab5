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

__all__ = [
    "Equivalence",
    "PairedTest",
    "equivalence_test",
    "one_sided_p",
    "paired_test",
    "sign_flip_p",
    "t_critical",
    "t_interval",
]

LEVEL = 0.95  # confidence level of every interval, and 1 - the test level (two-sided 0.05)
_EXACT_MAX_N = 20  # sign-flip test enumerates all 2**n sign vectors up to this n


def t_critical(df: int, level: float = LEVEL) -> float:
    """Two-sided critical value ``t_{(1+level)/2, df}`` of Student's t (scipy); NaN for df < 1.

    ``|t| > t_critical(n - 1)`` is the paired t test's rejection at ``1 - level`` (two-sided),
    the same rule as ``PairedTest.within_noise``; ``t_interval``'s half-width is it times the
    standard error.
    """
    if df < 1:
        return float("nan")
    return float(_scipy_stats.t.ppf(0.5 + level / 2, df=df))


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
    return mean, t_critical(x.size - 1, level) * float(x.std(ddof=1) / np.sqrt(x.size))


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
      t: paired t statistic ``diff / (s_d / √n)``; with no spread in the differences (``s_d``
        within rounding of 0), 0 when they are all 0 and ±inf when they are all the same
        non-zero value; nan for n = 1.
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

    Differences within rounding (``1e-12`` times the values' scale) of each other count as
    equal, and such a spread as none: accuracies that differ by the same count of test examples
    are the same difference however the floats round, and identical columns have difference 0.

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
    tol = 1e-12 * max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if n < 2:
        t = p = float("nan")
    elif sd > tol:
        t = float(diff / (sd / np.sqrt(n)))
        p = float(2 * _scipy_stats.t.sf(abs(t), df=n - 1))
    elif abs(diff) <= tol:  # every difference 0: no evidence either way
        t, p = 0.0, 1.0
    else:  # every difference the same non-zero value
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


def one_sided_p(differences: Sequence[float], shift: float, *, greater: bool) -> float:
    """One-sided p-value of the one-sample t test of ``mean(d) <= shift`` (``greater``) or
    ``mean(d) >= shift`` (not ``greater``), df = n - 1.

    ``t = (mean(d) - shift) / (s_d / sqrt(n))``; p = P(T_{n-1} >= t) for ``greater``, P(T_{n-1}
    <= t) otherwise. With no spread in the differences (``s_d`` within rounding of 0) the
    p-value is 0 when every difference lies on the alternative's side of ``shift`` and 1
    otherwise; nan for n < 2.
    """
    d = np.asarray(differences, np.float64)
    if d.size < 2:
        return float("nan")
    se = float(d.std(ddof=1)) / np.sqrt(d.size)
    gap = float(d.mean()) - shift
    if se <= 1e-12 * max(1.0, float(np.abs(d).max()), abs(shift)):
        return 0.0 if (gap > 0 if greater else gap < 0) else 1.0
    t = gap / se
    dist = _scipy_stats.t(df=d.size - 1)
    return float(dist.sf(t) if greater else dist.cdf(t))


class Equivalence(NamedTuple):
    """Two one-sided tests (TOST) of ``|mean(d)| < margin`` over paired differences.

    Attributes:
      n: number of pairs.
      diff: mean difference.
      low, high: the ``1 - 2 alpha`` t interval of the mean difference (nan for n < 2): the
        TOST at level alpha rejects both nulls exactly when it lies inside ``(-margin, margin)``.
      p_lower: p-value of the test of ``mean(d) <= -margin`` (rejected: not worse by the margin).
      p_upper: p-value of the test of ``mean(d) >= margin`` (rejected: not better by it).
      p: the TOST p-value ``max(p_lower, p_upper)``.
      margin: the equivalence margin.
      alpha: the level of each one-sided test.
    """

    n: int
    diff: float
    low: float
    high: float
    p_lower: float
    p_upper: float
    p: float
    margin: float
    alpha: float

    @property
    def equivalent(self) -> bool:
        """Both one-sided nulls rejected at ``alpha``: the difference is within the margin."""
        return bool(self.p < self.alpha)

    @property
    def worse(self) -> bool:
        """``mean(d) < -margin`` shown at ``alpha`` (the interval lies below ``-margin``)."""
        return bool(1 - self.p_lower < self.alpha)

    @property
    def better(self) -> bool:
        """``mean(d) > margin`` shown at ``alpha`` (the interval lies above ``margin``)."""
        return bool(1 - self.p_upper < self.alpha)


def equivalence_test(
    differences: Sequence[float], margin: float, *, alpha: float = 1 - LEVEL
) -> Equivalence:
    """TOST (Schuirmann 1987) of paired differences against the margin ``(-margin, margin)``.

    Two one-sided t tests at level ``alpha`` each: ``H0: mean <= -margin`` against ``mean >
    -margin`` and ``H0: mean >= margin`` against ``mean < margin``; equivalence is shown when
    both reject, i.e. when the ``1 - 2 alpha`` interval ``mean ± t_{1-alpha, n-1} se`` lies
    inside the margin. Low power (few seeds, large spread) leaves both nulls standing: no
    equivalence, so lack of evidence never counts as support.

    Args:
      differences: ``[n]`` paired differences (e.g. accuracy at r = 1 minus r = 12, points).
      margin: the equivalence margin (> 0, same units).
      alpha: level of each one-sided test.

    References:
      Schuirmann, "A comparison of the two one-sided tests procedure and the power approach
      for assessing the equivalence of average bioavailability", J. Pharmacokin. Biopharm.,
      1987.
    """
    d = np.asarray(differences, np.float64)
    if d.size == 0:
        raise ValueError("equivalence_test of no differences")
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}.")
    diff = float(d.mean())
    if d.size < 2:
        nan = float("nan")
        return Equivalence(d.size, diff, nan, nan, nan, nan, nan, float(margin), alpha)
    half = t_critical(d.size - 1, level=1 - 2 * alpha) * float(d.std(ddof=1)) / np.sqrt(d.size)
    p_lower = one_sided_p(d, -margin, greater=True)
    p_upper = one_sided_p(d, margin, greater=False)
    return Equivalence(
        n=int(d.size),
        diff=diff,
        low=diff - half,
        high=diff + half,
        p_lower=p_lower,
        p_upper=p_upper,
        p=max(p_lower, p_upper),
        margin=float(margin),
        alpha=alpha,
    )
