"""What the coordinator tells people in the event log, as pure functions of what it saw.

`observed_events(previous, current)`: what changed between two observations made by one
leader: members joined or lost, processes restarted or started. `previous` is None for a new
leader, which knows no history: only a node holding work but no lease is news (lost).
`write_events(obs, desired)`: what a write the leader made means (a role assigned or
removed, a replan, the Mooncake master restarted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pdsupervisor.core.cluster_view import Desired, Observed, assigned_roles, live_statuses
from pdsupervisor.core.models import ProcessStatus

EventKind = Literal["leader", "member", "process", "assign", "unassign", "replan", "master"]


@dataclass(frozen=True)
class ClusterEvent:
    kind: EventKind
    message: str
    fields: Mapping[str, object] = field(default_factory=dict)


def new_leader(name: str) -> ClusterEvent:
    return ClusterEvent("leader", f"{name} is the coordinator", {"node": name})


def _joined(node: str) -> ClusterEvent:
    return ClusterEvent("member", f"{node} joined", {"node": node})


def _lost(node: str) -> ClusterEvent:
    return ClusterEvent("member", f"{node} lost (lease expired)", {"node": node})


def _processes(obs: Observed) -> dict[tuple[str, str], ProcessStatus]:
    """What each live agent reports, by (node, process)."""
    return {(n, p.name): p for n, s in live_statuses(obs).items() for p in s.processes}


def observed_events(previous: Observed | None, current: Observed) -> list[ClusterEvent]:
    members = set(current.members)
    if previous is None:  # new leader: a node with work but no lease was lost
        return [_lost(node) for node in sorted(set(current.assignments) - members)]
    known = set(previous.members)
    events = [_joined(node) for node in sorted(members - known)]
    events += [_lost(node) for node in sorted(known - members)]
    before = _processes(previous)
    for (node, name), now in _processes(current).items():
        prev = before.get((node, name))
        if prev is None or now.pid is None:
            continue
        if now.restarts > prev.restarts:
            events.append(ClusterEvent(
                "process", f"{name} on {node} restarted (exit code {now.last_exit_code})",
                {"node": node, "process": name, "exit_code": now.last_exit_code, "restarts": now.restarts}))
        elif prev.pid is None or (prev.pid != now.pid and now.restarts == prev.restarts):
            events.append(ClusterEvent("process", f"{name} on {node} started (pid {now.pid})",
                                       {"node": node, "process": name, "pid": now.pid}))
    return events


def write_events(obs: Observed, desired: Desired) -> list[ClusterEvent]:
    """What writing `desired` over `obs` means for people (none for a mere spec-record update)."""
    before = assigned_roles(obs)
    after = {p.role for a in desired.assignments.values() if a for p in a.processes}
    events = [ClusterEvent("assign", "proxy released: every engine is ready" if role == "proxy" else f"{role} assigned",
                           {"role": role}) for role in sorted(after - before)]
    events += [ClusterEvent("unassign", f"{role} removed", {"role": role}) for role in sorted(before - after)]
    old, new = obs.record, desired.record
    if old is not None and new is not None and new.placement != old.placement and old.placement:
        events.append(ClusterEvent("replan", f"placement now {new.placement}", {"placement": new.placement}))
    if old is not None and new is not None and new.master_epoch != old.master_epoch:
        events.append(ClusterEvent(
            "master", f"mooncake master restarted (pid {old.master_pid} -> {new.master_pid}): "
            "restarting the engines, now that it is ready", {"pid": new.master_pid, "epoch": new.master_epoch}))
    return events
