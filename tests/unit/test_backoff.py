"""The one Backoff: doubling, capped, and jitter only when a caller injects it."""

from __future__ import annotations

import pytest

from cluo.backoff import Backoff, spread


def test_delays_double_from_the_initial_one_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    assert [backoff.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_the_factor_sets_the_growth() -> None:
    backoff = Backoff(initial=0.2, maximum=30.0, factor=3.0)
    assert [round(backoff.delay(n), 6) for n in range(1, 5)] == [0.2, 0.6, 1.8, 5.4]


def test_no_failure_yet_counts_as_the_first() -> None:
    assert Backoff().delay(0) == Backoff().delay(1) == 0.5


def test_a_very_long_outage_waits_the_maximum_and_does_not_overflow() -> None:
    assert Backoff(initial=0.5, maximum=30.0).delay(100_000) == 30.0
    assert Backoff(initial=1.0, maximum=1.0, factor=1.0).delay(10**9) == 1.0


def test_jitter_is_what_the_caller_injects() -> None:
    highest = spread(0.2, lambda low, high: high)
    lowest = spread(0.2, lambda low, high: low)
    assert Backoff(initial=1.0, maximum=30.0, jitter=highest).delay(2) == pytest.approx(2.4)
    assert Backoff(initial=1.0, maximum=30.0, jitter=lowest).delay(6) == pytest.approx(24.0)


@pytest.mark.parametrize("arguments", [
    {"initial": 0.0}, {"initial": 2.0, "maximum": 1.0}, {"factor": 0.5},
])
def test_a_backoff_that_cannot_work_is_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**arguments)


def test_a_jitter_fraction_must_keep_delays_positive() -> None:
    with pytest.raises(ValueError):
        spread(1.0, lambda low, high: low)
