import math

import numpy as np
import pytest

from tuneline.errors import InputError
from tuneline.stats import (
    discordant,
    mcnemar_detectable_difference,
    mcnemar_exact,
    mcnemar_sample_size,
    paired_bootstrap,
    planning_discordant_rate,
    wilson,
)


def test_wilson_known_values():
    # Reference values: Wilson score interval without continuity correction
    # (Newcombe 1998, method 3; 8/10 -> 0.4902..0.9433).
    rate, low, high = wilson(8, 10)
    assert rate == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)

    rate, low, high = wilson(0, 20)
    assert rate == 0.0
    assert low == 0.0
    assert high == pytest.approx(0.1611, abs=1e-4)

    rate, low, high = wilson(20, 20)
    assert (rate, high) == (1.0, pytest.approx(1.0))
    assert low == pytest.approx(1 - 0.1611, abs=1e-4)


def test_wilson_closed_form_and_level():
    k, n, z = 37, 60, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    _, low, high = wilson(k, n)
    assert low == pytest.approx(centre - half, abs=1e-10)
    assert high == pytest.approx(centre + half, abs=1e-10)
    _, low90, high90 = wilson(k, n, conf=0.90)
    assert low < low90 < p < high90 < high


@pytest.mark.parametrize("k,n", [(0, 0), (5, 4), (-1, 3)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(InputError, match="Wilson"):
        wilson(k, n)


def test_mcnemar_known_values():
    # 2 * P(X <= 2), X ~ Bin(12, 0.5) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=1e-4)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    # all five discordant pairs one way: 2 * 0.5**5
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    with pytest.raises(InputError):
        mcnemar_exact(-1, 2)


def test_discordant_counts():
    a = [1, 1, 0, 0, 1, 0]
    b = [1, 0, 1, 0, 0, 0]
    assert discordant(a, b) == (2, 1)
    with pytest.raises(InputError, match="length"):
        discordant([1, 0], [1])


def test_paired_bootstrap_contains_diff_and_is_deterministic():
    rng = np.random.default_rng(7)
    a = (rng.random(80) < 0.7).astype(int)
    b = (rng.random(80) < 0.4).astype(int)
    diff, low, high = paired_bootstrap(a, b, seed=3)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert low < diff < high
    assert paired_bootstrap(a, b, seed=3) == (diff, low, high)
    assert paired_bootstrap(a, b, seed=4) != (diff, low, high)
    # a wider level gives a wider interval from the same resamples
    _, low99, high99 = paired_bootstrap(a, b, seed=3, conf=0.99)
    assert low99 <= low and high99 >= high


def test_paired_bootstrap_matches_normal_theory():
    # For paired 0/1 data the difference of means has variance
    # (p10 + p01 - (p10 - p01)**2) / n; the bootstrap interval should be close to
    # the normal interval for a large sample.
    n = 400
    a = np.array([1] * 160 + [0] * 60 + [1] * 100 + [0] * 80)
    b = np.array([0] * 160 + [1] * 60 + [1] * 100 + [0] * 80)
    p10, p01 = 160 / n, 60 / n
    se = math.sqrt((p10 + p01 - (p10 - p01) ** 2) / n)
    diff, low, high = paired_bootstrap(a, b, n_resamples=5000, seed=0)
    assert diff == pytest.approx(0.25)
    assert low == pytest.approx(diff - 1.96 * se, abs=0.01)
    assert high == pytest.approx(diff + 1.96 * se, abs=0.01)


def test_paired_bootstrap_identical_vectors_give_zero_interval():
    a = [1, 0, 1, 1, 0]
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(InputError, match="length"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(InputError, match="at least one pair"):
        paired_bootstrap([], [])
    with pytest.raises(InputError, match="confidence"):
        paired_bootstrap([1], [0], conf=1.5)


def test_sample_size_connor_formula():
    # delta 0.10, psi 0.20, alpha 0.05, power 0.80:
    # (1.95996 * sqrt(0.2) + 0.84162 * sqrt(0.19))**2 / 0.01 = 154.6 -> 155
    assert mcnemar_sample_size(0.10, 0.20) == 155
    # more disagreement needs more pairs; more power needs more pairs
    assert mcnemar_sample_size(0.10, 0.40) > 155
    assert mcnemar_sample_size(0.10, 0.20, power=0.9) > 155
    # psi below delta is impossible for that difference and is floored at delta
    assert planning_discordant_rate(0.0, 0.1) == 0.1
    assert mcnemar_sample_size(0.10, 0.0) == mcnemar_sample_size(0.10, 0.10)


def test_detectable_difference_inverts_sample_size():
    for psi in (0.1, 0.2, 0.5):
        n = mcnemar_sample_size(0.10, psi)
        assert mcnemar_detectable_difference(n, psi) == pytest.approx(0.10, abs=0.002)
    assert mcnemar_detectable_difference(60, 0.2) > 0.10
    assert mcnemar_detectable_difference(1000, 0.2) < 0.10
    assert mcnemar_detectable_difference(1, 1.0) == 1.0
