"""Statistics for comparing models on one probe suite.

Rates get Wilson score intervals; paired differences between two models scored on the
same prompts get an exact McNemar test (two-sided binomial test on the discordant
pairs) and Newcombe's (1998) square-and-add score interval for paired proportions. The
tests are scipy's; this module fixes the conventions (two-sided, ``diff = a - b``) so
probe, compare and ``tuneline diff`` agree.

The power helpers use Connor's (1987) normal approximation for McNemar's test:

    n = (z_{1-alpha/2} * sqrt(psi) + z_{power} * sqrt(psi - delta**2))**2 / delta**2

where ``delta`` is the difference in rates and ``psi`` the discordant proportion
(the share of prompts on which the two models disagree). They are used for a planning
note, not for inference; the note plans with a conservative discordant rate
(:func:`conservative_discordant_rate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

from tuneline.errors import InputError


def _check_conf(conf: float) -> None:
    if not 0.0 < conf < 1.0:
        raise InputError(f"confidence level {conf!r} is not allowed; use a value strictly between 0 and 1")


def wilson(k: int, n: int, conf: float = 0.95) -> tuple[float, float, float]:
    """Rate ``k/n`` with its Wilson score interval: ``(rate, low, high)``."""
    _check_conf(conf)
    if n <= 0:
        raise InputError(f"Wilson interval needs n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise InputError(f"Wilson interval needs 0 <= k <= n, got k={k}, n={n}")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=conf, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    ``b``: pairs where only the first model succeeds; ``c``: only the second. Under the
    null each discordant pair is a fair coin, so the test is a binomial test of ``b``
    successes in ``b + c`` trials at p = 0.5. With no discordant pairs there is no
    evidence of a difference: p = 1.
    """
    if b < 0 or c < 0:
        raise InputError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def discordant(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """Counts of pairs where only ``a`` succeeds and where only ``b`` succeeds."""
    x, y = _paired_arrays(a, b)
    return int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))


def _paired_arrays(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.ndim != 1 or y.ndim != 1:
        raise InputError("paired statistics need two one-dimensional vectors")
    if x.shape != y.shape:
        raise InputError(f"paired vectors differ in length: {x.size} vs {y.size}; both models must be scored on the same prompts")
    if x.size == 0:
        raise InputError("paired statistics need at least one pair, got none")
    return x, y


def _wilson_bounds(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score bounds in closed form, elementwise (the same values as :func:`wilson`)."""
    p = k / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def newcombe_paired(
    both: ArrayLike, only_a: ArrayLike, only_b: ArrayLike, neither: ArrayLike, conf: float = 0.95
) -> tuple[Any, Any, Any]:
    """Difference of paired proportions with Newcombe's (1998) square-and-add score interval.

    The counts are the paired 2x2 table: ``both`` succeed, ``only_a``, ``only_b``,
    ``neither``; the difference is ``rate(a) - rate(b) = (only_a - only_b) / n``. Each
    rate gets its Wilson interval ``(l1, u1)``, ``(l2, u2)``, and the two are combined
    with the correlation between the paired rates (Newcombe 1998, method 10)::

        low  = d - sqrt((p1 - l1)**2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)**2)
        high = d + sqrt((p2 - l2)**2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)**2)

    ``phi`` is the phi coefficient of the table with Newcombe's correction for positive
    association (as in Fagerland, Lydersen and Laake 2014): with ``A = both*neither -
    only_a*only_b`` and the four margins' product ``M``, ``phi = (A - n/2)/sqrt(M)`` when
    ``A > n/2``, ``0`` when ``0 <= A <= n/2``, ``A/sqrt(M)`` when ``A < 0``, and ``0``
    when a margin is empty. Without the correction the interval is too narrow when few
    pairs are discordant and the models agree on most prompts (coverage near 0.87 for a
    nominal 0.95 with 2% and 1% discordance over 100 prompts).

    Works elementwise on arrays of counts (the coverage check simulates with it); returns
    floats for scalar counts. Defined for every table, n = 1 and identical outcomes included.
    """
    _check_conf(conf)
    a, b, c, d = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (both, only_a, only_b, neither)))
    if np.any((a < 0) | (b < 0) | (c < 0) | (d < 0)):
        raise InputError(f"paired counts must be >= 0, got {both}, {only_a}, {only_b}, {neither}")
    n = a + b + c + d
    if np.any(n < 1):
        raise InputError("paired statistics need at least one pair, got none")
    z = _z(1 - (1 - conf) / 2)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson_bounds(a + b, n, z)
    l2, u2 = _wilson_bounds(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    assoc = a * d - b * c
    corrected = np.where(assoc > n / 2, assoc - n / 2, np.where(assoc >= 0, 0.0, assoc))
    phi = np.where(margins > 0, corrected / np.sqrt(np.where(margins > 0, margins, 1.0)), 0.0)
    diff = p1 - p2
    low = diff - np.sqrt(np.maximum((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = diff + np.sqrt(np.maximum((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    low, high = np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)
    if diff.ndim == 0:
        return float(diff), float(low), float(high)
    return diff, low, high


def paired_difference(a: Sequence[float], b: Sequence[float], *, conf: float = 0.95) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` for paired 0/1 outcomes with Newcombe's interval (:func:`newcombe_paired`).

    It depends only on the paired 2x2 table, not on the order of the pairs.
    """
    x, y = _paired_arrays(a, b)
    if not (np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all()):
        raise InputError("paired proportions need 0/1 outcomes")
    both = int(np.sum((x == 1) & (y == 1)))
    only_a, only_b = discordant(x, y)
    return newcombe_paired(both, only_a, only_b, x.size - both - only_a - only_b, conf)


def mcnemar_min_discordant(alpha: float = 0.05) -> int:
    """Fewest discordant pairs with which the two-sided exact McNemar test can give p < alpha.

    The smallest p-value ``k`` discordant pairs can give is ``2 * 0.5**k`` (all one way),
    so with fewer prompts than this no difference can be significant at all.
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha {alpha!r} is not allowed; use a value in (0, 1)")
    k = 1
    while 2 * 0.5**k >= alpha:
        k += 1
    return k


def _z(q: float) -> float:
    return float(stats.norm.ppf(q))


def _check_power_args(delta: float, discordant_rate: float, alpha: float, power: float) -> None:
    if not 0.0 < delta < 1.0:
        raise InputError(f"difference to detect {delta!r} is not allowed; use a value in (0, 1)")
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha {alpha!r} is not allowed; use a value in (0, 1)")
    if not 0.0 < power < 1.0:
        raise InputError(f"power {power!r} is not allowed; use a value in (0, 1)")
    if not 0.0 <= discordant_rate <= 1.0:
        raise InputError(f"discordant rate {discordant_rate!r} is not allowed; use a value in [0, 1]")


def planning_discordant_rate(observed: float, delta: float) -> float:
    """Discordant proportion to plan with: the observed one, but at least ``delta``.

    Two models whose rates differ by ``delta`` disagree on at least a share ``delta`` of
    prompts, so a smaller observed value (e.g. 0 when the models agree everywhere) cannot
    describe the alternative being planned for.
    """
    return min(1.0, max(observed, delta))


def conservative_discordant_rate(k: int, n: int, delta: float, *, conf: float = 0.95) -> float:
    """Discordant proportion to plan with after observing ``k`` discordant pairs in ``n``.

    The upper Wilson bound of ``k/n`` (the needed n grows with the discordant rate, so
    the bound errs towards more prompts, not fewer), floored at ``delta`` as in
    :func:`planning_discordant_rate`. Planning with the point estimate ``k/n`` instead
    would trust the very sample whose size is in question.
    """
    return planning_discordant_rate(wilson(k, n, conf)[2], delta)


def mcnemar_sample_size(
    delta: float = 0.10,
    discordant_rate: float = 0.20,
    *,
    alpha: float = 0.05,
    power: float = 0.80,
) -> int:
    """Pairs needed to detect a difference ``delta`` with McNemar's test (Connor 1987)."""
    _check_power_args(delta, discordant_rate, alpha, power)
    psi = planning_discordant_rate(discordant_rate, delta)
    num = _z(1 - alpha / 2) * math.sqrt(psi) + _z(power) * math.sqrt(psi - delta**2)
    return math.ceil((num / delta) ** 2)


def mcnemar_detectable_difference(
    n: int,
    discordant_rate: float = 0.20,
    *,
    alpha: float = 0.05,
    power: float = 0.80,
) -> float:
    """Smallest difference detectable with ``n`` pairs at the given power (Connor 1987).

    The discordant rate is floored at the difference itself, as in
    :func:`planning_discordant_rate`. Returns 1.0 when even a difference of one cannot be
    reached with ``n`` pairs.
    """
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    _check_power_args(0.5, discordant_rate, alpha, power)
    za, zb = _z(1 - alpha / 2), _z(power)

    def required_n(delta: float) -> float:
        psi = planning_discordant_rate(discordant_rate, delta)
        return ((za * math.sqrt(psi) + zb * math.sqrt(max(psi - delta**2, 0.0))) / delta) ** 2

    upper = 1.0 - 1e-9
    if required_n(upper) > n:
        return 1.0
    return float(optimize.brentq(lambda d: required_n(d) - n, 1e-6, upper, xtol=1e-9))
