"""The statistics of scripts/kbfgs_divergence.py against SciPy's values and hand computations."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from kbfgs_divergence import fisher_exact, parse_seeds, wilson_interval


@pytest.mark.parametrize(
    ("table", "p_value"),
    [
        # scipy.stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue, SciPy 1.17 (recorded)
        ((2, 8, 6, 8), 0.13193473193473193),
        ((3, 16, 12, 16), 0.003847595161106487),
    ],
)
def test_fisher_exact_matches_scipy(table, p_value):
    assert fisher_exact(*table) == pytest.approx(p_value, rel=1e-12)


def test_fisher_exact_of_equal_rates_is_one_and_symmetric():
    assert fisher_exact(4, 16, 4, 16) == pytest.approx(1.0)
    assert fisher_exact(3, 16, 12, 16) == pytest.approx(fisher_exact(12, 16, 3, 16))


def test_wilson_interval_by_hand():
    # k = 5, n = 16: centre (p + z²/2n) / (1 + z²/n), half-width z √(p(1−p)/n + z²/4n²) / (1 + z²/n)
    z, p, n = 1.959964, 5 / 16, 16
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(5, 16) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 16)[0] == 0.0 and wilson_interval(16, 16)[1] == pytest.approx(1.0)


def test_seeds_are_ranges_or_lists():
    assert parse_seeds("0-3,9999") == [0, 1, 2, 3, 9999]
