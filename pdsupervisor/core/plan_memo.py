"""The last few plans, kept by exactly what they were computed from.

Planning a spec (parse, `place`, `plan_cluster`, the hard host checks) costs ~1 ms per node
(0.8 s at 1,024 nodes), and the coordinator and `GET /cluster` ask for it on every change,
nearly all of them status writes, which are no input of the plan. `PlanMemo` answers those
from the plan computed last: it keeps the few most recent (inputs, result) pairs and
compares inputs with `==`, so a changed input can never be answered with a stale plan, and
unchanged objects (a watch-fed cache hands the same ones out again) compare by identity
in O(1) per member.

Pure and thread-safe (the coordinator may decide in a worker thread while the API reads).
Results are shared: callers must not mutate them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.observed import SpecRecord

R = TypeVar("R")


@dataclass(frozen=True, eq=True)
class PlanInputs:
    """Everything `cluster_view.try_plan` reads: the record's spec and what of the record the
    planner takes (previous placement, generation, epochs, nodes not to replace), and every
    member's facts. Members last: tuple equality stops at the first difference, and the
    cheap fields differ first when anything but membership changed."""

    spec: Mapping[str, Any]
    placement: Mapping[str, list[str]]
    generation: int
    master_epoch: int
    group_epoch: int
    unmanaged: tuple[str, ...]
    recently_lost: tuple[str, ...]
    members: Mapping[str, NodeFacts]


def plan_inputs(record: SpecRecord, members: Mapping[str, NodeFacts]) -> PlanInputs:
    return PlanInputs(spec=record.spec, placement=record.placement, generation=record.generation,
                      master_epoch=record.master_epoch, group_epoch=record.group_epoch,
                      unmanaged=tuple(record.unmanaged), recently_lost=tuple(record.recently_lost),
                      members=members)


class PlanMemo(Generic[R]):
    """The `size` most recently used (inputs, result) pairs. `size` > 1: `desired_state` plans
    the record and, when the master or the DP group restarts, a bumped record too."""

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: list[tuple[PlanInputs, R]] = []  # most recent first
        self._lock = threading.Lock()

    def get(self, inputs: PlanInputs, compute: Callable[[], R]) -> R:
        """The result for `inputs`: kept, or `compute()` (outside the lock) and kept."""
        with self._lock:
            for i, (kept, result) in enumerate(self._entries):
                if kept == inputs:
                    self._entries.insert(0, self._entries.pop(i))
                    self.hits += 1
                    return result
            self.misses += 1
        result = compute()
        self.put(inputs, result)
        return result

    def put(self, inputs: PlanInputs, result: R) -> None:
        """Keep `result` for `inputs` (what computing it would give), as the most recent."""
        with self._lock:
            self._entries = [(inputs, result), *(e for e in self._entries if e[0] != inputs)][: self.size]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
