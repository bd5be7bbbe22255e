"""How long the coordinator waits between two cycles: bursts of changes share one cycle.

At 1,000 agents, status writes arrive faster than a cycle (which reads and judges the
whole cluster) can run; deciding once per write would spend every core on decisions that
the next write makes stale. After a cycle the leader waits for at least `MIN_GAP_S` (a
burst of watch events coalesces) and, when the cycle was long, for as long again as it
took times `(1 - duty) / duty`, so deciding takes at most `duty` of a core whatever the
rate of changes, and a change waits at most one such gap (bounded by `MAX_GAP_S`).
"""

from __future__ import annotations

MIN_GAP_S = 0.02  # the least wait: lets a burst of watch events coalesce into one cycle
MAX_GAP_S = 2.0  # the most: a change is acted on within this after the last cycle ended
DUTY = 0.5  # the share of a core the coordinator's cycles may take


def cycle_gap(last_cycle_s: float, *, duty: float = DUTY, min_gap_s: float = MIN_GAP_S,
              max_gap_s: float = MAX_GAP_S) -> float:
    """Seconds from the end of a cycle that took `last_cycle_s` to the start of the next."""
    if not 0 < duty <= 1:
        raise ValueError(f"duty must be in (0, 1], not {duty}")
    if last_cycle_s < 0:
        raise ValueError(f"last_cycle_s must not be negative, not {last_cycle_s}")
    return min(max_gap_s, max(min_gap_s, last_cycle_s * (1 - duty) / duty))
