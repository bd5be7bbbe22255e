"""What a managed process's status says about its failures, kept between its attempts.

A status used to say why only while in `backoff`; the next attempt's `starting`/`running`
wiped it, so a crash loop read as `running` most of the time. `Failures` keeps the last
reason, how many failures in a row (reset once a run lasted `restart.reset_after_s`, as the
backoff is), since when it has been down, and when and how long after it was ready again.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

import psutil

from pdsupervisor.core.exits import spoken_duration

STOPS_KEPT = 5  # escalated stops a node reports (oldest dropped): enough for the coordinator to see each


@dataclass
class Failures:
    last: str | None = None
    last_at: float | None = None  # wall clock
    in_a_row: int = 0
    down_since: float | None = None  # wall clock: the first failure since it was last ready
    ready_again_at: float | None = None
    ready_again_after_s: float | None = None

    def failed(self, reason: str, now: float) -> None:
        self.last, self.last_at = reason, now
        self.in_a_row += 1
        if self.down_since is None:
            self.down_since = now

    def ready(self, now: float) -> None:
        """Ready: after a failure, say when and how long it took."""
        if self.down_since is not None:
            self.ready_again_at = now
            self.ready_again_after_s = round(max(0.0, now - self.down_since), 1)
            self.down_since = None

    def stable(self) -> bool:
        """A run lasted `reset_after_s`: no longer failing in a row. True if that changed anything."""
        changed = self.in_a_row != 0
        self.in_a_row = 0
        return changed

    def status_fields(self) -> dict[str, Any]:
        return {"last_failure": self.last, "last_failure_at": self.last_at, "failures_in_a_row": self.in_a_row,
                "down_since": self.down_since, "ready_again_at": self.ready_again_at,
                "ready_again_after_s": self.ready_again_after_s}


def escalation(root: int, sig: signal.Signals, timeout: float, escalated: list[psutil.Process]) -> str:
    """How a stop ended when SIGKILL had to finish it: `SIGKILL after 30 s (SIGTERM ignored)`."""
    others = len([p for p in escalated if p.pid != root])
    after = f"SIGKILL after {spoken_duration(timeout)}"
    if len(escalated) == others:  # the root obeyed (or was gone): its workers did not
        return f"{after} ({sig.name} ignored by {others} of its processes)"
    more = f", and by {others} more of its processes" if others else ""
    return f"{after} ({sig.name} ignored{more})"
