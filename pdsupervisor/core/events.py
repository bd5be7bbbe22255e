"""What the coordinator tells people in the event log, as pure functions of what it saw.

`observed_events(previous, current)`: what changed between two observations made by one
leader: members joined or lost, processes restarted (with why), started, failed for good, ready
again after failing (with how long it took), stops that took SIGKILL. `previous` is None for
a new leader, which knows no history: only a node holding work but no lease is news (lost).
Statuses carry the moments (`last_failure_at`, `ready_again_at`, each escalated stop's `at`),
so what happened between two observations is still told once.
`write_events(obs, desired)`: what a write the leader made means (a role assigned or
removed, a replan, the Mooncake master restarted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pdsupervisor.core.cluster_view import Desired
from pdsupervisor.core.exits import spoken_duration
from pdsupervisor.core.models import NodeStatus, ProcessState, ProcessStatus, same_spec
from pdsupervisor.core.observed import Observed, assigned_roles, assigned_spec, live_statuses
from pdsupervisor.core.planner import ENGINE_ROLES

EventKind = Literal["leader", "member", "process", "assign", "unassign", "replan", "master", "rollout"]


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
    return obs.processes


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
        if prev is not None:
            events += _process_events(node, prev, now)
    then = live_statuses(previous)
    for node, status in live_statuses(current).items():
        if node in then:
            events += _stops_escalated(node, then[node], status)
    return events


def _process_events(node: str, prev: ProcessStatus, now: ProcessStatus) -> list[ClusterEvent]:
    name, ids = now.name, {"node": node, "process": now.name}
    events: list[ClusterEvent] = []
    if now.restarts > prev.restarts and now.last_failure:  # the agent says why (a spawn failure has no pid)
        events.append(ClusterEvent(
            "process", f"{name} on {node} restarted: {now.last_failure}",
            {**ids, "exit_code": now.last_exit_code, "restarts": now.restarts, "reason": now.last_failure}))
    elif now.pid is not None and now.restarts > prev.restarts:  # an agent that predates the reasons
        events.append(ClusterEvent(
            "process", f"{name} on {node} restarted (exit code {now.last_exit_code})",
            {**ids, "exit_code": now.last_exit_code, "restarts": now.restarts}))
    elif now.pid is not None and (prev.pid is None or (prev.pid != now.pid and now.restarts == prev.restarts)):
        events.append(ClusterEvent("process", f"{name} on {node} started (pid {now.pid})", {**ids, "pid": now.pid}))
    new_failure = now.last_failure_at is not None and now.last_failure_at != prev.last_failure_at
    if new_failure and now.state == ProcessState.failed and now.restarts == prev.restarts:
        events.append(ClusterEvent("process", f"{name} on {node} failed, not restarted: {now.last_failure}",
                                   {**ids, "exit_code": now.last_exit_code, "reason": now.last_failure}))
    if now.ready_again_at is not None and now.ready_again_at != prev.ready_again_at:
        after = now.ready_again_after_s or 0.0
        ready = ClusterEvent("process", f"{name} on {node} ready again after {spoken_duration(after)}",
                             {**ids, "after_s": after})
        # before a restart reported with it, if it failed again since (both seen at once)
        failed_since = now.last_failure_at is not None and now.last_failure_at > now.ready_again_at
        events.insert(0 if failed_since else len(events), ready)
    return events


def _stops_escalated(node: str, prev: NodeStatus, now: NodeStatus) -> list[ClusterEvent]:
    seen = {(s.process, s.at) for s in prev.stops_escalated}
    return [ClusterEvent("process", f"{s.process} on {node}: stop escalated to {s.how}",
                         {"node": node, "process": s.process, "how": s.how})
            for s in now.stops_escalated if (s.process, s.at) not in seen]


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
    if old is not None and new is not None and new.group_epoch != old.group_epoch:
        events.append(ClusterEvent("process", f"decode DP group restarted as a whole: {new.group_reason}",
                                   {"reason": new.group_reason, "group_epoch": new.group_epoch}))
    events += _wave(obs, desired)
    if old is not None and new is not None:
        events += [ClusterEvent("member", f"{n} unmanaged: its agent is away, its engines still answer (they keep "
                                "serving; the node is not replaced while they do)", {"node": n})
                   for n in sorted(set(new.unmanaged) - set(old.unmanaged))]
        events += [ClusterEvent("member", f"{n} managed again" if n in obs.members else
                                f"{n} lost: none of its engines answered for policy.node_loss_grace_s", {"node": n})
                   for n in sorted(set(old.unmanaged) - set(new.unmanaged))]
    if old is not None and new is not None and new.master_epoch != old.master_epoch:
        events.append(ClusterEvent(
            "master", f"mooncake master restarted (pid {old.master_pid} -> {new.master_pid}): "
            "restarting the engines, now that it is ready", {"pid": new.master_pid, "epoch": new.master_epoch}))
    return events


def _wave(obs: Observed, desired: Desired) -> list[ClusterEvent]:
    """Running engines this write changes to a new spec: one rollout wave."""
    changed: list[str] = []
    roles: set[str] = set()
    for node, a in sorted(desired.assignments.items()):
        for proc in a.processes if a else []:
            held = assigned_spec(obs, node, proc.name)
            if proc.role in ENGINE_ROLES and held is not None and not same_spec(held, proc):
                changed.append(f"{proc.name} on {node}")
                roles.add(proc.role)
    if not changed:
        return []
    how = [("the DP group as one unit" if r.group else f"at most {r.max_unavailable} {r.role} not ready at a time")
           for r in (desired.rollout.roles if desired.rollout else ()) if r.role in roles]
    return [ClusterEvent("rollout", f"rolling out to {', '.join(changed)} ({'; '.join(how)})", {"processes": changed})]


def rollout_halted(before: str | None, now: str | None) -> list[ClusterEvent]:
    """The rollout halted (an engine failed with its new spec), or went on again."""
    if now is not None and now != before:
        return [ClusterEvent("rollout", f"{now}; the engines not yet changed keep the previous spec", {"halted": True})]
    if now is None and before is not None:
        return [ClusterEvent("rollout", "rollout no longer halted", {"halted": False})]
    return []
