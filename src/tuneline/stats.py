"""Statistics for comparing models on one probe suite.

Rates get Wilson score intervals; paired differences between two models scored on the
same prompts get an exact McNemar test (two-sided binomial test on the discordant
pairs) and a seeded percentile bootstrap interval. The computations are scipy's; this
module fixes the conventions (two-sided, percentile bootstrap, ``diff = a - b``) so
probe, compare and ``tuneline diff`` agree.

The power helpers use Connor's (1987) normal approximation for McNemar's test:

    n = (z_{1-alpha/2} * sqrt(psi) + z_{power} * sqrt(psi - delta**2))**2 / delta**2

where ``delta`` is the difference in rates and ``psi`` the discordant proportion
(the share of prompts on which the two models disagree). They are used for a planning
note, not for inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    conf: float = 0.95,
) -> tuple[float, float, float]:
    """Difference ``mean(a) - mean(b)`` with a paired percentile bootstrap interval.

    Pairs (prompt i scored for both models) are resampled together, so the interval
    accounts for the correlation between the two models' results. Deterministic for a
    given ``seed``.
    """
    _check_conf(conf)
    if n_resamples < 1:
        raise InputError(f"n_resamples must be >= 1, got {n_resamples}")
    x, y = _paired_arrays(a, b)
    diff = float(x.mean() - y.mean())
    result = stats.bootstrap(
        (x, y),
        _mean_difference,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=conf,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return diff, float(result.confidence_interval.low), float(result.confidence_interval.high)


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
