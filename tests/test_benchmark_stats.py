"""benchmarks/common.py's percentile: the nearest-rank rule every benchmark figure uses."""

from __future__ import annotations

import math

from benchmarks.common import percentile


def test_nearest_rank_on_small_samples() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert [percentile(values, p) for p in (0, 25, 26, 50, 51, 75, 99, 100)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert percentile([7.0], 50) == 7.0
    assert math.isnan(percentile([], 50))


def test_whole_ranks_are_exact() -> None:
    values = list(range(1, 101))
    # 7 / 100 * 100 is 7.000000000000001 in floating point: the rank must still be 7
    assert [percentile(values, p) for p in (1, 7, 29, 50, 57, 99, 100)] == [1, 7, 29, 50, 57, 99, 100]
    assert percentile(list(range(1, 1001)), 99.9) == 999


def test_the_smallest_value_with_at_least_p_percent_at_or_below_it() -> None:
    for n in range(1, 41):
        values = [float(v) for v in range(n)]
        for p in range(1, 101):
            got = percentile(values, p)
            assert sum(v <= got for v in values) * 100 >= p * n
            assert sum(v < got for v in values) * 100 < p * n
