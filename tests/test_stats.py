import math

import numpy as np
import pytest

from tuneline.errors import InputError
from tuneline.stats import (
    conservative_discordant_rate,
    discordant,
    mcnemar_detectable_difference,
    mcnemar_exact,
    mcnemar_min_discordant,
    mcnemar_sample_size,
    newcombe_paired,
    paired_difference,
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


def test_newcombe_published_examples():
    # Newcombe (1998), paired example (a, b, c, d) = (36, 12, 2, 0): method 10 gives
    # 0.0569 to 0.3404 for the difference 0.2.
    diff, low, high = newcombe_paired(36, 12, 2, 0)
    assert diff == pytest.approx(0.2)
    assert (low, high) == (pytest.approx(0.0569, abs=5e-5), pytest.approx(0.3404, abs=5e-5))
    # Cavo et al. (2012) as worked in Fagerland, Lydersen & Laake (2014, 2017), Newcombe
    # square-and-add: (59, 6, 16, 80) -> -0.0621 (-0.1186 to -0.0046). This table has
    # A = 59*80 - 6*16 > n/2, so it checks the corrected phi.
    diff, low, high = newcombe_paired(59, 6, 16, 80)
    assert diff == pytest.approx(-10 / 161)
    assert (low, high) == (pytest.approx(-0.1186, abs=5e-5), pytest.approx(-0.0046, abs=5e-5))


def test_newcombe_by_hand():
    # The committed dpo vs sft schema validity: both 51, only dpo 3, only sft 1, neither 5.
    a, b, c, d = 51, 3, 1, 5
    n = a + b + c + d
    _, l1, u1 = wilson(a + b, n)
    _, l2, u2 = wilson(a + c, n)
    p1, p2 = (a + b) / n, (a + c) / n
    phi = (a * d - b * c - n / 2) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))  # a*d - b*c = 252 > 30
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = p1 - p2 + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    assert newcombe_paired(a, b, c, d) == (pytest.approx(2 / 60), pytest.approx(low), pytest.approx(high))
    assert (round(low, 4), round(high, 4)) == (-0.0476, 0.1205)
    # negative association: phi = (a*d - b*c) / sqrt(margins), uncorrected
    a, b, c, d = 2, 10, 9, 3
    n = a + b + c + d
    _, l1, u1 = wilson(a + b, n)
    _, l2, u2 = wilson(a + c, n)
    p1, p2 = (a + b) / n, (a + c) / n
    phi = (a * d - b * c) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    assert newcombe_paired(a, b, c, d)[1] == pytest.approx(low)


def test_newcombe_coverage_by_simulation():
    # Coverage of the nominal 95% interval over 2,000 simulated paired samples per setting
    # (p both, p only a, p only b, n), including few discordant pairs on many concordant
    # ones, where a percentile bootstrap or the uncorrected phi is too narrow.
    rng = np.random.default_rng(20261201)
    for p11, p10, p01, n in [(0.5, 0.02, 0.01, 100), (0.8, 0.05, 0.02, 60), (0.85, 0.03, 0.03, 60),
                             (0.4, 0.1, 0.05, 30), (0.3, 0.3, 0.1, 20), (0.45, 0.05, 0.05, 10)]:
        tables = rng.multinomial(n, [p11, p10, p01, 1 - p11 - p10 - p01], size=2000)
        _, low, high = newcombe_paired(*tables.T)
        truth = p10 - p01
        coverage = np.mean((low <= truth + 1e-12) & (truth - 1e-12 <= high))
        assert coverage >= 0.93, (p11, p10, p01, n, coverage)


def test_newcombe_small_and_degenerate_tables():
    for table in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 0, 0), (0, 1, 1, 0),
                  (5, 0, 0, 5), (60, 0, 0, 0), (0, 60, 0, 0)]:
        diff, low, high = newcombe_paired(*table)
        assert -1.0 <= low <= diff <= high <= 1.0, table
        assert high > low, table
    # identical outcomes: a symmetric interval around 0 of non-zero width
    diff, low, high = newcombe_paired(5, 0, 0, 5)
    assert diff == 0.0 and low == pytest.approx(-high) and high > 0.1
    # all 60 one way: margins are empty, phi = 0, low = 1 - sqrt((1 - l1)**2 + u2**2)
    upper_of_zero = wilson(0, 60)[2]
    assert newcombe_paired(0, 60, 0, 0) == (1.0, pytest.approx(1 - math.sqrt(2) * upper_of_zero), 1.0)
    with pytest.raises(InputError, match="at least one pair"):
        newcombe_paired(0, 0, 0, 0)
    with pytest.raises(InputError, match=">= 0"):
        newcombe_paired(1, -1, 0, 0)
    with pytest.raises(InputError, match="confidence"):
        newcombe_paired(1, 0, 0, 0, conf=1.5)


def test_paired_difference_from_vectors_ignores_order():
    a = [1, 1, 0, 0, 1, 0, 1, 1]
    b = [1, 0, 1, 0, 0, 0, 1, 1]
    diff, low, high = paired_difference(a, b)
    assert (diff, low, high) == newcombe_paired(3, 2, 1, 2)
    order = [3, 0, 7, 5, 1, 6, 2, 4]
    assert paired_difference([a[i] for i in order], [b[i] for i in order]) == (diff, low, high)
    _, low90, high90 = paired_difference(a, b, conf=0.9)
    assert low < low90 and high90 < high
    with pytest.raises(InputError, match="length"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(InputError, match="at least one pair"):
        paired_difference([], [])
    with pytest.raises(InputError, match="0/1"):
        paired_difference([0.5], [1])


def test_fewest_discordant_pairs_for_significance():
    # 2 * 0.5**5 = 0.0625 >= 0.05, 2 * 0.5**6 = 0.031 < 0.05
    assert mcnemar_min_discordant(0.05) == 6
    assert mcnemar_exact(6, 0) < 0.05 <= mcnemar_exact(5, 0)
    assert mcnemar_min_discordant(0.01) == 8
    with pytest.raises(InputError, match="alpha"):
        mcnemar_min_discordant(0.0)


def test_conservative_discordant_rate_is_the_upper_bound_floored_at_delta():
    assert conservative_discordant_rate(4, 60, 0.1) == pytest.approx(wilson(4, 60)[2])
    assert conservative_discordant_rate(4, 60, 0.1) > 4 / 60
    assert conservative_discordant_rate(0, 400, 0.1) == 0.1


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
