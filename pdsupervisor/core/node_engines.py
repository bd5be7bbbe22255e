"""What each node's engines are doing against the plan, kept per node between revisions.

The rollout (`core.rollout`), the decode group's check and the phase ask the same questions
of every engine of the cluster at every revision (is it ready, does it hold its planned spec,
did it fail to take it): 8,192 engines at 1,024 nodes, ~100 ms a revision. A node's answers
depend only on its own inputs: the plan's node (the plan memo's object), its assignment, its
status and its member facts (whether that status is live). The watch-fed cache keeps an
unchanged key's object, so after one status change one node is asked again, and each role's
sums are added up from the nodes' kept answers.

A node's answers are kept only when they do not depend on the clock (an engine that has not
been ready yet fails its start timeout as time passes): such a node is asked again each time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus, same_spec
from pdsupervisor.core.observed import Observed, ready_running
from pdsupervisor.core.planner import ENGINE_ROLES, NodePlan, Plan


@dataclass(frozen=True)
class RoleEngines:
    """A node's planned engines of one role (in plan order), summed for the rollout."""

    total: int
    updated: int  # hold nothing yet (new) or hold their planned spec
    unavailable: int  # not ready running what they hold (the planned spec when they hold nothing)
    outdated_up: tuple[tuple[str, str], ...]  # (node, process) holding another spec, ready
    outdated_down: tuple[tuple[str, str], ...]  # the same, not ready
    ready: bool  # every one ready running its planned spec (`observed.is_ready`)
    pids: tuple[tuple[str, int], ...]  # (`node/process`, pid) of those seen with a pid


@dataclass(frozen=True)
class NodeEngines:
    """One node's answers."""

    roles: dict[str, RoleEngines]  # by engine role (both present, maybe empty)
    failures: tuple[str, ...]  # `judge_failure` of engines holding their planned spec, in plan order
    assigned_ready: bool  # every assigned process ready with its assigned spec (`phase_of`)
    clocked: bool  # an answer depends on `now`: not kept


def live_processes(status: NodeStatus | None, member: NodeFacts | None) -> dict[str, ProcessStatus]:
    """What the node's live agent reports, by name (first of a name), as `Observed.processes`."""
    if status is None or not status.current_for(member):
        return {}
    out: dict[str, ProcessStatus] = {}
    for p in status.processes:
        out.setdefault(p.name, p)
    return out


def assigned_by_name(assignment: NodeAssignment | None) -> dict[str, ProcessSpec]:
    """What the node is assigned, by name (first of a name), as `Observed.assigned`."""
    out: dict[str, ProcessSpec] = {}
    for p in assignment.processes if assignment is not None else []:
        out.setdefault(p.name, p)
    return out


def seen_process(obs: Observed, node: str, name: str) -> ProcessStatus | None:
    """`observed.observed_process` from the node's own keys: no index of every process of the
    cluster is built (8,192 entries at 1,024 nodes, per revision) to ask about one node."""
    status = obs.statuses.get(node)
    if status is None or not status.current_for(obs.members.get(node)):
        return None
    return next((p for p in status.processes if p.name == name), None)


def seen_ready(obs: Observed, node: str, proc: ProcessSpec) -> bool:
    """`observed.is_ready` from the node's own keys (see `seen_process`)."""
    return ready_running(seen_process(obs, node, proc.name), proc)


class AssignedRoles:
    """`observed.assigned_roles`, from each node's roles kept while its assignment is the very
    same object (a union of ~1,000 small sets, not a walk of every assigned process)."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[NodeAssignment, frozenset[str]]] = {}

    def of(self, obs: Observed) -> set[str]:
        out: set[str] = set()
        for node, a in obs.assignments.items():
            kept = self._kept.get(node)
            if kept is None or kept[0] is not a:
                kept = self._kept[node] = (a, frozenset(p.role for p in a.processes))
            out |= kept[1]
        if len(self._kept) > 2 * len(obs.assignments) + 64:
            for node in set(self._kept) - set(obs.assignments):
                self._kept.pop(node, None)
        return out

    def clear(self) -> None:
        self._kept.clear()


ASSIGNED_ROLES = AssignedRoles()


def summarize(node: str, planned: NodePlan | None, assignment: NodeAssignment | None, status: NodeStatus | None,
              member: NodeFacts | None, now: float | None) -> NodeEngines:
    """The node's answers, from its inputs alone (what `rollout.plan_rollout`, `phase_of` and
    `cluster_view.group_restart` would find asking `Observed` engine by engine)."""
    seen_by_name = live_processes(status, member)
    held_by_name = assigned_by_name(assignment)
    counts = {r: [0, 0, 0] for r in ENGINE_ROLES}  # total, updated, unavailable
    up: dict[str, list[tuple[str, str]]] = {r: [] for r in ENGINE_ROLES}
    down: dict[str, list[tuple[str, str]]] = {r: [] for r in ENGINE_ROLES}
    ready = dict.fromkeys(ENGINE_ROLES, True)
    pids: dict[str, list[tuple[str, int]]] = {r: [] for r in ENGINE_ROLES}
    failures: list[str] = []
    clocked = False
    for proc in planned.processes if planned is not None else []:
        role = proc.role
        if role not in ENGINE_ROLES:
            continue
        held, seen = held_by_name.get(proc.name), seen_by_name.get(proc.name)
        holds = held is not None and same_spec(held, proc)
        current_ready = ready_running(seen, held or proc)
        c = counts[role]
        c[0] += 1
        c[2] += not current_ready
        if held is None or holds:
            c[1] += 1
        else:
            (up if current_ready else down)[role].append((node, proc.name))
        ready[role] = ready[role] and ready_running(seen, proc)
        if seen is not None and seen.pid is not None:
            pids[role].append((f"{node}/{proc.name}", seen.pid))
        if holds:
            why, depends = judge_failure(seen, node, proc, now)
            clocked = clocked or depends
            if why is not None:
                failures.append(why)
    assigned_ready = all(ready_running(seen_by_name.get(p.name), p)
                         for p in (assignment.processes if assignment is not None else []))
    roles = {r: RoleEngines(total=counts[r][0], updated=counts[r][1], unavailable=counts[r][2],
                            outdated_up=tuple(up[r]), outdated_down=tuple(down[r]), ready=ready[r],
                            pids=tuple(pids[r]))
             for r in ENGINE_ROLES}
    return NodeEngines(roles=roles, failures=tuple(failures), assigned_ready=assigned_ready, clocked=clocked)


def judge_failure(seen: ProcessStatus | None, node: str, planned: ProcessSpec,
                  now: float | None) -> tuple[str | None, bool]:
    """Why an engine assigned `planned` failed to take it, or None (fine, or not known yet),
    from what its live agent reports (`seen`), and whether the answer depends on `now` (one not
    ready yet fails its start timeout as time passes). Stable words (no counts, no ages): the
    rollout's halt event is told once, not at every change."""
    if seen is None:
        return None, False
    where = f"{planned.name} on {node}"
    new_hash = planned.spec_hash()
    if seen.refused_spec_hash == new_hash:  # refused by its node; the old process still runs
        return f"{where}: refused by its node: {seen.refused}", False
    if seen.spec_hash != new_hash:
        return None, False  # still stopping the old one
    if seen.state == ProcessState.failed:
        return f"{where}: {seen.message or seen.last_failure or 'failed'}", False
    if seen.state == ProcessState.ready:
        return None, False
    last = seen.last_failure or ""
    if seen.failures_in_a_row and last.startswith("spawn failed"):
        return f"{where}: {last}", False
    if seen.crash_looping:
        return f"{where}: crash loop, last: {last}", False
    timeout = planned.start_timeout_s
    never_ready = seen.ready_after_s is None  # in this run: one that served and then lost readiness did start
    if timeout and never_ready and seen.started_at:
        if now is not None and now - seen.started_at > timeout:
            return f"{where}: not ready within its start_timeout_s ({timeout:g} s)", True
        return None, True
    return None, False


class NodeEnginesMemo:
    """Each node's `NodeEngines`, kept while its inputs are the very same objects (and its
    answers do not depend on the clock). Holds those objects, so their ids cannot be reused.
    Safe to share between threads: two callers may both make a node's answers; either is right."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[object, ...], NodeEngines]] = {}
        self._lock = threading.Lock()
        self.made = 0  # nodes whose answers were made (not reused): for tests

    def of(self, obs: Observed, node: str, planned: NodePlan | None, now: float | None) -> NodeEngines:
        assignment, status, member = obs.assignments.get(node), obs.statuses.get(node), obs.members.get(node)
        kept = self._kept.get(node)
        if kept is not None:
            k = kept[0]
            if k[0] is planned and k[1] is assignment and k[2] is status and k[3] is member:
                return kept[1]
        made = summarize(node, planned, assignment, status, member, now)
        self.made += 1
        if not made.clocked:
            with self._lock:
                self._kept[node] = ((planned, assignment, status, member), made)
        return made

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    def of_plan(self, obs: Observed, plan: Plan, now: float | None) -> list[NodeEngines]:
        """Every planned node's answers, in plan order (`Plan.engines()` order within a role)."""
        out = [self.of(obs, node, planned, now) for node, planned in plan.nodes.items()]
        if len(self._kept) > 2 * len(plan.nodes) + 64:  # nodes gone from the plan: forget them
            with self._lock:
                for node in set(self._kept) - set(plan.nodes):
                    self._kept.pop(node, None)
        return out


NODE_ENGINES = NodeEnginesMemo()
