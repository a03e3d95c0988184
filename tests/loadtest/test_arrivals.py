"""Arrival schedules: Poisson keeps its mean rate, constant keeps its spacing, both bounded."""

from __future__ import annotations

import itertools
import statistics

import pytest

from loadtest.generator import (
    MAX_DURATION_CAP_S,
    MAX_REQUESTS_CAP,
    BoundsError,
    arrival_offsets,
    check_bounds,
)


def test_poisson_mean_rate_within_tolerance() -> None:
    rate, duration = 200.0, 100.0
    offsets = arrival_offsets("poisson", rate, duration, 1_000_000, seed=7)
    # 20k arrivals: the count's standard deviation is sqrt(20k) ~ 0.7 %.
    assert len(offsets) == pytest.approx(rate * duration, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: standard deviation equals the mean (constant spacing would give 0).
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert all(0 <= t < duration for t in offsets)
    assert offsets == sorted(offsets)


def test_poisson_is_seeded() -> None:
    a = arrival_offsets("poisson", 50, 10, 10_000, seed=1)
    assert a == arrival_offsets("poisson", 50, 10, 10_000, seed=1)
    assert a != arrival_offsets("poisson", 50, 10, 10_000, seed=2)


def test_constant_spacing() -> None:
    offsets = arrival_offsets("constant", 40.0, 2.0, 10_000)
    assert len(offsets) == 80
    assert offsets[0] == 0.0
    for a, b in itertools.pairwise(offsets):
        assert b - a == pytest.approx(0.025, abs=1e-12)


@pytest.mark.parametrize("arrivals", ["poisson", "constant"])
def test_schedule_bounded_by_count_and_time(arrivals: str) -> None:
    assert len(arrival_offsets(arrivals, 1000, 60, 123)) == 123
    assert max(arrival_offsets(arrivals, 10, 1.5, 10_000)) < 1.5


@pytest.mark.parametrize(
    ("duration", "count"),
    [(0, 10), (-1, 10), (MAX_DURATION_CAP_S + 1, 10), (10, 0), (10, MAX_REQUESTS_CAP + 1)],
)
def test_unbounded_runs_refused(duration: float, count: int) -> None:
    with pytest.raises(BoundsError):
        check_bounds(duration, count)
    with pytest.raises(BoundsError):
        arrival_offsets("constant", 10, duration, count)


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="arrivals"):
        arrival_offsets("bursty", 10, 1, 10)
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets("poisson", 0, 1, 10)
