"""The coordinator's pacing: short cycles follow each other after the coalescing gap; long
ones leave as much time again, so deciding takes at most half a core."""

from __future__ import annotations

import pytest

from pdsupervisor.core.pacing import MAX_GAP_S, MIN_GAP_S, cycle_gap


def test_a_short_cycle_waits_only_for_a_burst_to_coalesce():
    assert cycle_gap(0.0) == MIN_GAP_S
    assert cycle_gap(0.005) == MIN_GAP_S


def test_a_long_cycle_is_followed_by_as_long_a_gap():
    assert cycle_gap(0.3) == pytest.approx(0.3)
    busy = 0.4
    assert busy / (busy + cycle_gap(busy)) == pytest.approx(0.5)  # half a core at most


def test_the_duty_cycle_sets_the_gap_and_the_gap_is_bounded():
    assert cycle_gap(0.3, duty=0.25) == pytest.approx(0.9)
    assert cycle_gap(0.3, duty=1.0) == MIN_GAP_S
    assert cycle_gap(60.0) == MAX_GAP_S  # a change waits at most this after a cycle


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"last_cycle_s": 0.1, "duty": 0.0}, "duty must be in"),
    ({"last_cycle_s": 0.1, "duty": 1.5}, "duty must be in"),
    ({"last_cycle_s": -1.0}, "last_cycle_s must not be negative"),
])
def test_bad_input_is_named(kwargs, error):
    with pytest.raises(ValueError, match=error):
        cycle_gap(**kwargs)
