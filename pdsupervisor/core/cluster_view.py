"""Pure functions from what etcd holds to what the cluster is and should be.

Shared by the coordinator (desired assignments) and the REST API (`GET /cluster`), so that
any agent can answer a read and the leader decides from the very same view.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from pdsupervisor.core.checks import hard_failures
from pdsupervisor.core.documents import ClusterDocument, Phase, ProcessRow, RolloutDocument, RolloutRole
from pdsupervisor.core.models import NodeAssignment, NodeFacts, ProcessSpec, ProcessState, ProcessStatus, same_spec
from pdsupervisor.core.node_engines import (
    ASSIGNED_ROLES,
    NODE_ENGINES,
    assigned_by_name,
    live_processes,
    seen_process,
    seen_ready,
)
from pdsupervisor.core.observed import (
    Observed,
    SpecRecord,
    assigned_roles,
    is_ready,
    live_statuses,
    observed_process,
)
from pdsupervisor.core.plan_memo import PlanMemo, plan_inputs
from pdsupervisor.core.planner import ENGINE_ROLES, NodePlan, Plan, PlanError, plan_cluster
from pdsupervisor.core.rollout import Rollout, impact, plan_rollout
from pdsupervisor.core.spec import ClusterSpec, SpecError, validate_spec

CRASH_LOOPING = "crash-looping"  # a row's state: failed `CRASH_LOOP_FAILURES` times in a row, not ready
# Stop order: proxy first, then engines, then the master. Start order is the reverse.
STOP_STAGES: tuple[tuple[str, ...], ...] = (("proxy",), ENGINE_ROLES, ("mooncake-master",))


@dataclass
class Desired:
    """What the coordinator should write: assignments by node (None = delete) and the record."""

    assignments: dict[str, NodeAssignment | None]
    record: SpecRecord | None
    plan: Plan | None
    missing: list[str] = field(default_factory=list)
    spec: ClusterSpec | None = None  # the validated spec of a `start` record
    rollout: Rollout | None = None  # how running engines change to the plan (a `start` with a plan)


def try_plan(obs: Observed, record: SpecRecord | None = None) -> tuple[ClusterSpec | None, Plan | None, list[str]]:
    """Plan `record` (default: the recorded one) on the live members; the problems say what is missing.

    Memoized on exactly its inputs (`PLANS`): a status change, the bulk of all changes, re-plans nothing.
    """
    if record is None:
        record = obs.record
    if record is None:
        return None, None, []
    members = obs.members
    inputs = plan_inputs(record, members)
    spec, plan, missing = PLANS.get(inputs, lambda: _plan(record, members))
    if plan is not None and plan.placement != record.placement:
        # The coordinator records this placement next (`desired_state`). Planned again from it,
        # every slot stays where it is (`planner.place` keeps a registered previous node): the
        # same plan. Kept for it now, so that the first cycle after the write re-plans nothing
        # (a second whole plan at 1,024 nodes).
        PLANS.put(replace(inputs, placement=plan.placement), (spec, plan, missing))
    return spec, plan, list(missing)


PLANS: PlanMemo[tuple[ClusterSpec | None, Plan | None, list[str]]] = PlanMemo()


def _plan(record: SpecRecord, members: Mapping[str, NodeFacts]) -> tuple[ClusterSpec | None, Plan | None, list[str]]:
    """What `try_plan` computes, from exactly what `plan_memo.PlanInputs` holds."""
    try:
        spec = validate_spec(record.spec)
    except SpecError as exc:  # validated on submit; only a hand-edited key can get here
        return None, None, [f"{p}: {w}" for p, w in exc.problems]
    try:
        plan = plan_cluster(spec, members, previous=record.placement or None,
                            generation=record.generation, restart_epoch=record.master_epoch,
                            group_epoch=record.group_epoch, unmanaged=record.unmanaged,
                            recently_lost=record.recently_lost)
    except PlanError as exc:
        return spec, None, [f"{p}: {w}" for p, w in exc.problems]
    refused = hard_failures(spec, members, plan)
    if refused:  # a planned node misses a host requirement the spec makes hard: stay pending
        return spec, None, [f"{node}: {check}: {why}" for node, check, why in refused]
    return spec, plan, []


def master_restart(obs: Observed, plan: Plan) -> SpecRecord | None:
    """The record with the master's new pid (and a new engine epoch when it restarted).

    The master is tracked once ready; a different ready pid later means it restarted and
    lost Mooncake's metadata, so every engine is restarted, after the master is ready again.
    Several masters (`mooncake.replicas`, HA): never; the engines' store clients follow the
    newly elected leader, and the agent restarts the dead master as any process.
    """
    record = obs.record
    masters = plan.masters()
    if record is None or len(masters) != 1 or not seen_ready(obs, *masters[0]):
        return None
    seen = seen_process(obs, masters[0][0], masters[0][1].name)
    if seen is None or seen.pid is None or seen.pid == record.master_pid:
        return None
    engines_assigned = not ASSIGNED_ROLES.of(obs).isdisjoint(ENGINE_ROLES)
    bump = record.master_pid is not None and engines_assigned
    return record.model_copy(update={"master_pid": seen.pid, "master_epoch": record.master_epoch + int(bump)})


def desired_state(obs: Observed, now: float | None = None) -> Desired:
    """Start in order (master, engines, proxy), stop in reverse; keep what runs when unsure;
    change running engines in waves (`pdsupervisor.core.rollout`). `now` (wall clock): judge
    start timeouts too."""
    record = obs.record
    current: dict[str, NodeAssignment | None] = dict(obs.assignments)
    if record is None:
        return Desired(assignments=current, record=None, plan=None)
    if record.action == "stop":
        return Desired(assignments=_stop_step(obs), record=record, plan=None)

    spec, plan, missing = try_plan(obs)
    restarted = master_restart(obs, plan) if plan is not None else None
    if restarted is not None and restarted.master_epoch != record.master_epoch:
        # a new master epoch gives the engines a new hash (their agents restart them): plan
        # with it (the master's own spec, which master_restart looked at, has no epoch)
        spec, plan, missing = try_plan(obs, restarted)
    if plan is None:  # a member is short or lost under `wait`: leave what runs alone
        return Desired(assignments=current, record=record, plan=None, missing=missing, spec=spec)
    record = restarted or record
    assert spec is not None
    regrouped = group_restart(obs, plan, spec, record, now)
    if regrouped is not None and regrouped.group_epoch != record.group_epoch:
        spec, plan, missing = try_plan(obs, regrouped)  # every rank's spec changes: they restart together
        if plan is None or spec is None:
            return Desired(assignments=current, record=record, plan=None, missing=missing, spec=spec)
    record = regrouped or record
    rollout = plan_rollout(obs, plan, spec, now)

    masters_ready = all(seen_ready(obs, n, p) for n, p in plan.masters())
    engines_released = masters_ready or any(_assigned_name(obs, n, p.name) for n, p in plan.engines())
    proxy_released = "proxy" in ASSIGNED_ROLES.of(obs) or (
        engines_released and all(n.roles[r].ready for n in NODE_ENGINES.of_plan(obs, plan, now) for r in ENGINE_ROLES)
    )
    allowed: dict[str, set[str]] = {}
    for node, name in rollout.allowed:
        allowed.setdefault(node, set()).add(name)
    wanted: dict[str, list[ProcessSpec]] = {}
    for node, planned in plan.nodes.items():
        procs = WANTED.of(node, planned, obs.assignments.get(node), (engines_released, masters_ready, proxy_released),
                          frozenset(allowed.get(node, ())))
        if procs:
            wanted[node] = procs
    desired: dict[str, NodeAssignment | None] = {
        node: BUILT.assignment(obs, node, record.generation, procs) for node, procs in wanted.items()
    }
    for node in obs.assignments:
        desired.setdefault(node, None)
    return Desired(assignments=desired, record=record.model_copy(update={"placement": plan.placement}), plan=plan,
                   spec=spec, rollout=rollout)


def _assigned_name(obs: Observed, node: str, name: str) -> bool:
    a = obs.assignments.get(node)
    return a is not None and any(p.name == name for p in a.processes)


def wanted_of(planned: NodePlan, assignment: NodeAssignment | None, released: tuple[bool, bool, bool],
              allowed: frozenset[str]) -> list[ProcessSpec]:
    """What one node should run: its planned processes but etcd (its agent starts it), held
    back as `desired_state` says. `released`: (engines released, masters ready, proxy
    released); `allowed`: its outdated engines that take their planned spec now."""
    engines_released, masters_ready, proxy_released = released
    held_by_name = assigned_by_name(assignment)
    out: list[ProcessSpec] = []
    for proc in planned.processes:
        if proc.role == "etcd":
            continue
        if proc.role in ENGINE_ROLES and not engines_released:
            continue
        if proc.role in ENGINE_ROLES and not masters_ready:
            # The master is (re)starting, e.g. a replacing spec changed it: an engine keeps
            # what it runs until the master is ready, then restarts once (new epoch and new
            # spec together) instead of once now and once more for the master's new pid.
            held = held_by_name.get(proc.name)
            if held is not None:
                out.append(held)
            continue
        if proc.role == "proxy" and not proxy_released:
            continue
        if proc.role in ENGINE_ROLES and proc.name not in allowed:
            held = held_by_name.get(proc.name)
            if held is not None and not same_spec(held, proc):
                proc = held  # not its wave yet (or the rollout halted): keep what runs
        out.append(proc)
    return out


class WantedMemo:
    """`wanted_of` per node, kept while its planned node and assignment are the very same
    objects and the flags and its allowed engines are equal: a status change asks one node
    again, not every planned process. Returns the kept list: callers do not change it."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[object, ...], list[ProcessSpec]]] = {}

    def of(self, node: str, planned: NodePlan, assignment: NodeAssignment | None, released: tuple[bool, bool, bool],
           allowed: frozenset[str]) -> list[ProcessSpec]:
        kept = self._kept.get(node)
        if kept is not None:
            k = kept[0]
            if k[0] is planned and k[1] is assignment and k[2] == released and k[3] == allowed:
                return kept[1]
        out = wanted_of(planned, assignment, released, allowed)
        self._kept[node] = ((planned, assignment, released, allowed), out)
        return out


WANTED = WantedMemo()


class BuiltAssignments:
    """The wanted assignment of each node, as an object already made when one holds exactly
    these fields (the very same process objects: the plan memo's, or what is held): the
    observed one (the cluster cache keeps what the leader wrote), else the one made last time.
    Why: building a `NodeAssignment` validates every process (~65 us a node: 65 ms a revision
    at 1,024 nodes), and `changes` skips an assignment that is the observed object itself. The
    content is the same either way. Holds the objects it returns, so their ids are not reused;
    callers never change them (the coordinator writes them as they are)."""

    def __init__(self) -> None:
        self._made: dict[str, NodeAssignment] = {}

    def assignment(self, obs: Observed, node: str, generation: int, procs: list[ProcessSpec]) -> NodeAssignment:
        have = obs.assignments.get(node)
        if have is not None and _holds_exactly(have, node, generation, procs):
            return have
        made = self._made.get(node)
        if made is not None and _holds_exactly(made, node, generation, procs):
            return made
        made = self._made[node] = NodeAssignment(node=node, generation=generation, processes=procs)
        return made


def _holds_exactly(a: NodeAssignment, node: str, generation: int, procs: list[ProcessSpec]) -> bool:
    return (a.node == node and a.generation == generation and len(a.processes) == len(procs)
            and all(x is y for x, y in zip(a.processes, procs, strict=True)))


BUILT = BuiltAssignments()


def group_restart(obs: Observed, plan: Plan, spec: ClusterSpec, record: SpecRecord, now: float | None) -> SpecRecord | None:
    """The record restarting the decode DP group as a whole, or with its restart count reset.

    Once the group formed (every rank ready with these specs), a rank running the group's
    spec that failed since it was ready, that is another process than the one that formed the
    group (its node was lost and came back, its agent restarted it), that stopped passing its
    readiness probe for `node_loss_grace_s` (alive but broken: its peer died), or a rank
    re-placed on another node, breaks the group: its
    peers cannot go on without it, and it cannot rejoin them alone. Before it formed, a rank
    that fails (e.g. one that came up while the previous group's rank 0 still ran, and was
    refused) joins on its own restart: the others are still waiting for it.
    Group restarts back off like a process's (`policy.restart`), counted until the group is
    ready. Only with `now`: the backoff needs the clock.
    """
    d = spec.decode
    if d.dp_mode != "group" or d.group_restart != "group" or plan.dp_size <= 1:
        return None
    formed = _formed(plan)
    policy = spec.policy.restart
    nodes = NODE_ENGINES.of_plan(obs, plan, now)
    if all(n.roles["decode"].ready for n in nodes):
        pids = {key: pid for n in nodes for key, pid in n.roles["decode"].pids}
        if record.group_ready != formed or record.group_pids != pids:  # it formed (now: counted from here)
            return record.model_copy(update={"group_ready": formed, "group_pids": pids,
                                             "group_formed_at": (now or 0.0) if record.group_ready != formed
                                             else record.group_formed_at})
        if record.group_restarts and now is not None and now - record.group_formed_at >= policy.reset_after_s:
            return record.model_copy(update={"group_restarts": 0})  # stable as long as a process must be
        return None
    ranks = [(n, p) for n, p in plan.engines() if p.role == "decode"]
    reason = None
    before = record.placement.get("decode")
    replaced = bool(before) and before != plan.placement["decode"]
    if replaced:
        moved = [f"{a} -> {b}" for a, b in zip(before or [], plan.placement["decode"], strict=False) if a != b]
        reason = f"decode node replaced ({', '.join(moved)})"
    for node, proc in ranks:
        seen = observed_process(obs, node, proc.name)
        if reason is not None or record.group_ready != formed or seen is None or seen.spec_hash != proc.spec_hash():
            continue
        formed_pid = record.group_pids.get(f"{node}/{proc.name}")
        if _failed_since_ready(seen):
            reason = f"{proc.name} on {node} (rank {proc.dp_rank}) failed: {seen.last_failure}"
        elif formed_pid is not None and seen.pid is not None and seen.pid != formed_pid:
            reason = (f"{proc.name} on {node} (rank {proc.dp_rank}) is a new process (pid {formed_pid} -> {seen.pid}): "
                      "it cannot rejoin the group that formed")
        elif seen.state != ProcessState.ready and seen.ready_lost_at is not None and now is not None \
                and now - seen.ready_lost_at >= spec.policy.node_loss_grace_s:
            # alive but not ready for a while (not merely busy): a rank whose peer died (a real
            # API server may stay up)
            reason = f"{proc.name} on {node} (rank {proc.dp_rank}) no longer ready: {seen.message or 'readiness lost'}"
    if reason is None or now is None:
        return None
    wait = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** record.group_restarts)
    if now - record.group_since < wait and not replaced:  # a replacement is news once: never held back
        return None
    return record.model_copy(update={"group_epoch": record.group_epoch + 1, "group_since": now,
                                     "group_restarts": record.group_restarts + 1, "group_reason": reason})


_FORMED: list[tuple[Plan, str]] = []  # the last plan's digest of its ranks' specs (held: its id stays its own)


def _formed(plan: Plan) -> str:
    """The digest of the decode ranks' spec hashes a formed group is recorded with, kept for
    the last plan (the plan memo's object: the same at every revision but a new plan's)."""
    kept = _FORMED[0] if _FORMED else None
    if kept is not None and kept[0] is plan:
        return kept[1]
    ranks = [p for _, p in plan.engines() if p.role == "decode"]
    formed = hashlib.sha256(" ".join(sorted(p.spec_hash() for p in ranks)).encode()).hexdigest()[:16]
    _FORMED[:] = [(plan, formed)]
    return formed


def _failed_since_ready(seen: ProcessStatus) -> bool:
    """It failed after it was last ready (not a start-up failure it has since got over)."""
    if seen.last_failure is None or seen.last_failure_at is None:
        return False
    return seen.ready_again_at is None or seen.last_failure_at > seen.ready_again_at


def change_impact(obs: Observed) -> list[str]:
    """What the recorded spec's change does to the engines running now (`core.rollout.impact`)."""
    desired = desired_state(obs)
    if desired.plan is None or desired.rollout is None:
        return []
    return impact(obs, desired.plan, desired.rollout)


def _stop_step(obs: Observed) -> dict[str, NodeAssignment | None]:
    """Remove the next stage only once the previous one is gone from every live node."""
    live, roles = live_statuses(obs), assigned_roles(obs)
    for stage in STOP_STAGES:
        if not roles.isdisjoint(stage):
            out: dict[str, NodeAssignment | None] = {}
            for node, a in obs.assignments.items():
                keep = [p for p in a.processes if p.role not in stage]
                out[node] = a.model_copy(update={"processes": keep}) if keep else None
            return out
        if any(p.role in stage for s in live.values() for p in s.processes):
            return dict(obs.assignments)  # wait for this stage to be gone
    return {node: None for node in obs.assignments}


@dataclass
class Changes:
    """What the coordinator must write to get from `obs` to `desired`."""

    puts: dict[str, NodeAssignment] = field(default_factory=dict)  # by node
    deletes: list[str] = field(default_factory=list)  # nodes
    record: SpecRecord | None = None  # the record to write, when it changed

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.record)


class KnownEqual:
    """Assignments found equal to what was wanted, remembered by object identity.

    An assignment compares field by field (~8 us a process: 65 ms a cycle at 1,024 nodes x 8
    engines). Between cycles the observed assignment of a node is the very same object while
    its key is unchanged (a watch-fed cache), and the wanted processes are the plan's own (the
    plan memo): the same objects as last time are equal as last time. Holds those objects,
    so their ids cannot be reused. One per deciding loop (not thread-safe).
    """

    def __init__(self) -> None:
        self._pairs: dict[str, tuple[NodeAssignment, NodeAssignment]] = {}

    def equal(self, node: str, have: NodeAssignment, want: NodeAssignment) -> bool:
        kept = self._pairs.get(node)
        if kept is not None and kept[0] is have and _same_objects(kept[1], want):
            return True
        if have == want:
            self._pairs[node] = (have, want)
            return True
        self._pairs.pop(node, None)
        return False

    def keep_only(self, nodes: Collection[str]) -> None:
        for node in set(self._pairs) - set(nodes):
            del self._pairs[node]


def _same_objects(a: NodeAssignment, b: NodeAssignment) -> bool:
    """Every field the same (`NodeAssignment`: node, generation, processes), each process the very same object."""
    return (a.node == b.node and a.generation == b.generation and len(a.processes) == len(b.processes)
            and all(x is y for x, y in zip(a.processes, b.processes, strict=True)))


def changes(obs: Observed, desired: Desired, known: KnownEqual | None = None) -> Changes:
    """`known`: assignments found equal in earlier calls (see `KnownEqual`), to skip comparing them again."""
    out = Changes()
    nodes = sorted(set(desired.assignments) | set(obs.assignments))
    for node in nodes:
        want, have = desired.assignments.get(node), obs.assignments.get(node)
        if want is None:
            if have is not None:
                out.deletes.append(node)
        elif have is None:
            out.puts[node] = want
        elif have is not want and not (known.equal(node, have, want) if known is not None else have == want):
            out.puts[node] = want
    if known is not None:
        known.keep_only(nodes)
    if desired.record is not None and desired.record != obs.record:
        out.record = desired.record
    return out


def converged(obs: Observed, desired: Desired) -> bool:
    """The coordinator has no assignment left to write (a new generation or master epoch
    changes every assignment; record bookkeeping such as the spare list does not count).

    Without this, the moment between a replacing spec's submission and the coordinator's
    next cycle (or a master restart and the engines' new epoch) would read as `ready`.
    """
    return written_all(changes(obs, desired))


def written_all(todo: Changes) -> bool:
    """`converged`, from the changes already computed."""
    return not (todo.puts or todo.deletes)


def phase_of(obs: Observed, desired: Desired, todo: Changes | None = None) -> Phase:
    """`todo`: `changes(obs, desired)` when already computed (not computed again)."""
    record = obs.record
    if record is None:
        return "stopped"
    live = live_statuses(obs)
    running = any(p.role != "etcd" for s in live.values() for p in s.processes)
    if record.action == "stop":
        return "stopping" if obs.assignments or running else "stopped"
    if not obs.assignments:
        return "pending" if desired.plan is None else "starting"
    lost = [n for n in obs.assignments if n not in obs.members]
    if lost:
        return "degraded"
    rollout = desired.rollout
    if rollout is not None and rollout.halted:
        return "degraded"
    if rollout is not None and rollout.active:
        return "updating"
    plan = desired.plan
    # each node's kept answer (`core.node_engines`): one node asked again after its status changed
    all_ready = all(NODE_ENGINES.of(obs, n, plan.nodes.get(n) if plan is not None else None, None).assigned_ready
                    for n in obs.assignments)
    proxy_assigned = "proxy" in ASSIGNED_ROLES.of(obs)
    if all_ready and proxy_assigned:
        # not before the coordinator wrote what it decided: a replacing spec (or a master
        # restart's new epoch) it has not applied yet would otherwise read as ready
        done = written_all(todo) if todo is not None else converged(obs, desired)
        return "ready" if done else "starting"
    if not proxy_assigned:
        return "starting"
    assigned = [(n, p) for n, a in obs.assignments.items() for p in a.processes]
    proxy = [observed_process(obs, n, p.name) for n, p in assigned if p.role == "proxy"]
    first_start = all(p is None or (p.restarts == 0 and p.state != ProcessState.ready) for p in proxy)
    engines_ready = all(is_ready(obs, n, p) for n, p in assigned if p.role != "proxy")
    # the proxy coming up for the first time after every engine was ready is still starting
    return "starting" if first_start and engines_ready else "degraded"


def stopped_on_purpose(seen: ProcessStatus, assigned: ProcessSpec) -> bool:
    """The agent stops it because its assignment changed (`stopping` only ever means that), or
    it exited so while running a previous spec: a replacement under way, not a failure."""
    if seen.state == ProcessState.stopping:
        return True
    return seen.state == ProcessState.exited and bool(seen.spec_hash) and seen.spec_hash != assigned.spec_hash()


def clock(ts: float, now: float) -> str:
    """A moment for people, in the local time of whoever computes it: the time of day, with
    the date unless it was within the last 12 hours."""
    recent = 0 <= now - ts < 12 * 3600
    return time.strftime("%H:%M:%S" if recent else "%Y-%m-%d %H:%M:%S", time.localtime(ts))


def problems_of(obs: Observed, spec: ClusterSpec | None, phase: Phase, now: float) -> tuple[list[str], bool]:
    """What a person should look at, and whether the start ran past `policy.start_timeout_s`."""
    problems: list[str] = []
    for node, a in sorted(obs.assignments.items()):
        problems += PROBLEMS.of(obs, node, a, now)
    PROBLEMS.keep_only(obs.assignments)
    timed_out = False
    record = obs.record
    if record and spec and phase in ("pending", "starting") and record.submitted_at:
        waited = now - record.submitted_at
        if waited > spec.policy.start_timeout_s:
            timed_out = True
            problems.append(f"cluster not ready {waited:.0f} s after submission "
                            f"(policy.start_timeout_s {spec.policy.start_timeout_s:g})")
    return problems, timed_out


def node_problems(node: str, a: NodeAssignment, seen_by_name: Mapping[str, ProcessStatus],
                  now: float) -> tuple[list[str], bool]:
    """`problems_of` for one node's processes, and whether they depend on `now` (a time of day
    said, or a start timeout that passes as time goes on)."""
    problems: list[str] = []
    clocked = False
    for proc in a.processes:
        seen = seen_by_name.get(proc.name)
        if seen is None or stopped_on_purpose(seen, proc):
            continue
        detail = f": {seen.message}" if seen.message else ""
        if seen.state in (ProcessState.backoff, ProcessState.exited, ProcessState.failed):
            problems.append(f"{proc.name} on {node}: {seen.state.value} ({_counts(seen)}){detail}")
        elif seen.state != ProcessState.ready and seen.ready_lost_at is not None:
            clocked = True
            problems.append(f"{proc.name} on {node}: not ready since {clock(seen.ready_lost_at, now)} "
                            f"(was ready){detail}")
        elif seen.state in (ProcessState.starting, ProcessState.running) and seen.failures_in_a_row \
                and seen.last_failure:
            problems.append(f"{proc.name} on {node}: {seen.state.value} again {_failed(seen)}{detail}")
        elif seen.state != ProcessState.ready and proc.start_timeout_s and seen.started_at:
            clocked = True
            if now - seen.started_at > proc.start_timeout_s:
                problems.append(f"{proc.name} on {node}: not ready {now - seen.started_at:.0f} s after starting "
                                f"(start_timeout_s {proc.start_timeout_s:g})")
    return problems, clocked


class ProblemMemo:
    """Each node's problems, kept while its assignment, status and member facts are the very
    same objects and they do not depend on the clock: a status change asks one node again.
    Holds those objects, so their ids cannot be reused. Returns the kept list: callers copy it."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[object, ...], list[str]]] = {}

    def of(self, obs: Observed, node: str, a: NodeAssignment, now: float) -> list[str]:
        status, member = obs.statuses.get(node), obs.members.get(node)
        kept = self._kept.get(node)
        if kept is not None:
            k = kept[0]
            if k[0] is a and k[1] is status and k[2] is member:
                return kept[1]
        problems, clocked = node_problems(node, a, live_processes(status, member), now)
        if clocked:
            self._kept.pop(node, None)
        else:
            self._kept[node] = ((a, status, member), problems)
        return problems

    def keep_only(self, nodes: Collection[str]) -> None:
        for node in set(self._kept) - set(nodes):
            self._kept.pop(node, None)


PROBLEMS = ProblemMemo()


def _counts(seen: ProcessStatus) -> str:
    """`exit code 127, restarts 4`: the exit code unless there is none (a spawn failure) or
    the reason already says it (`exit code 1: ...`)."""
    code = seen.last_exit_code
    said = code is None or f"exit code {code}" in (seen.last_failure or "")
    return f"restarts {seen.restarts}" if said else f"exit code {code}, restarts {seen.restarts}"


def _failed(seen: ProcessStatus) -> str:
    """Why a process starting or running again failed before: the crash loop seen between
    its failures too, not only while it waits out a backoff."""
    if seen.crash_looping:
        return f"in a crash loop ({seen.failures_in_a_row} failures in a row), last: {seen.last_failure}"
    return f"after a failure: {seen.last_failure}"


class SharedDesired:
    """`desired_state` of one observation, made once for both of its askers: the coordinator's
    decision and `GET /cluster` (same agent, same cluster cache, so the very same `Observed`
    object per revision). At 1,024 nodes it is ~150 ms of CPU; a status change made both ask
    for it at once, each slowing the other (one GIL). A second ask for the same object within
    `max_age_s` of the first one's `now` gets that result (what depends on the clock, backoffs
    and timeouts of seconds, moves by less than that); a lock makes a concurrent asker wait
    for the one computing instead of computing it too. Holds the last observation only."""

    def __init__(self, max_age_s: float = 0.5) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last: tuple[Observed, float, Desired] | None = None

    def get(self, obs: Observed, now: float) -> Desired:
        with self._lock:
            last = self._last
            if last is not None and last[0] is obs and abs(now - last[1]) <= self.max_age_s:
                return last[2]
            desired = desired_state(obs, now)
            self._last = (obs, now, desired)
            return desired

    def clear(self) -> None:
        with self._lock:
            self._last = None


DESIRED = SharedDesired()


class RowMemo:
    """`GET /cluster`'s process rows of each node, kept while the node's inputs are the very
    same objects: its assignment, its status, its member facts (a live status is one written
    under the current member lease) and whether the record calls it unmanaged. The watch-fed
    cache keeps an unchanged key's object, so after a status change one node's rows are made
    again, not 8,192. Holds those objects, so their ids cannot be reused. Thread-safe enough
    for its use: concurrent documents may both make a node's rows; either is right."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[tuple[object, ...], list[ProcessRow]]] = {}
        self.made = 0  # nodes whose rows were made (not reused): for tests

    def rows(self, obs: Observed, node: str, a: NodeAssignment) -> list[ProcessRow]:
        unmanaged = obs.record is not None and node in obs.record.unmanaged
        inputs = (a, obs.statuses.get(node), obs.members.get(node), unmanaged)
        kept = self._rows.get(node)
        if kept is not None:
            k = kept[0]
            if k[0] is a and k[1] is inputs[1] and k[2] is inputs[2] and k[3] is unmanaged:
                return kept[1]
        rows = [_process_row(obs, node, proc) for proc in a.processes]
        self._rows[node] = (inputs, rows)
        self.made += 1
        return rows

    def keep_only(self, nodes: Collection[str]) -> None:
        for node in set(self._rows) - set(nodes):
            self._rows.pop(node, None)


ROWS = RowMemo()


def forget_kept() -> None:
    """Forget everything kept between revisions (plans, per-node answers, rows, ...): what
    follows is made afresh (tests compare the two)."""
    global ROWS, BUILT, WANTED, PROBLEMS, _DOCUMENT_KNOWN
    PLANS.clear()
    DESIRED.clear()
    NODE_ENGINES.clear()
    ASSIGNED_ROLES.clear()
    _FORMED.clear()
    _UNASSIGNED.clear()
    ROWS, BUILT, WANTED, PROBLEMS = RowMemo(), BuiltAssignments(), WantedMemo(), ProblemMemo()
    _DOCUMENT_KNOWN = KnownEqual()


_DOCUMENT_KNOWN = KnownEqual()  # the document's own (`KnownEqual` is one per deciding loop)
_DOCUMENT_KNOWN_LOCK = threading.Lock()


def cluster_document(obs: Observed, now: float) -> ClusterDocument:
    """The `GET /cluster` document (also `pdsupervisor status -o json`)."""
    desired = DESIRED.get(obs, now)  # the same decision the coordinator makes from this view
    spec, plan = desired.spec, desired.plan
    with _DOCUMENT_KNOWN_LOCK:  # documents may be made in several threads at once
        todo = changes(obs, desired, _DOCUMENT_KNOWN)
    phase = phase_of(obs, desired, todo)
    problems, timed_out = problems_of(obs, spec, phase, now)
    rollout = desired.rollout
    if rollout is not None and rollout.halted:
        problems.insert(0, rollout.halted)
    processes: list[ProcessRow] = []
    for node, a in sorted(obs.assignments.items()):
        processes += ROWS.rows(obs, node, a)
    ROWS.keep_only(obs.assignments)
    proxy_url: str | None
    if plan is not None:  # only a start has a plan: what it plans and no node is assigned yet
        for node, planned in plan.nodes.items():
            processes += [_process_row(obs, node, proc, default_state="waiting")
                          for proc in _unassigned(node, planned, obs.assignments.get(node))]
        proxy_url = plan.proxy_url
    else:  # without a plan (a node lost under `wait`), the proxy that runs still serves: show where
        assigned_proxy = next((p.endpoint for a in obs.assignments.values() for p in a.processes
                               if p.role == "proxy" and p.endpoint), None)
        proxy_url = f"http://{assigned_proxy}" if assigned_proxy else None
    return ClusterDocument(
        cluster=obs.record.spec.get("cluster") if obs.record else None,
        generation=obs.record.generation if obs.record else 0,
        action=obs.record.action if obs.record else None,
        phase=phase,
        leader=obs.leader,
        missing=desired.missing,
        problems=problems,
        start_timed_out=timed_out,
        members=sorted(obs.members),
        placement=plan.placement if plan else (obs.record.placement if obs.record else {}),
        proxy_url=proxy_url,
        processes=processes,
        rollout=_rollout_document(rollout),
    )


_UNASSIGNED: dict[str, tuple[NodePlan, NodeAssignment | None, list[ProcessSpec]]] = {}


def _unassigned(node: str, planned: NodePlan, a: NodeAssignment | None) -> list[ProcessSpec]:
    """The node's planned processes (but etcd) not in its assignment, kept while the planned
    node and the assignment are the very same objects (empty once started: no walk of them)."""
    kept = _UNASSIGNED.get(node)
    if kept is not None and kept[0] is planned and kept[1] is a:
        return kept[2]
    names = {p.name for p in a.processes} if a is not None else set()
    out = [p for p in planned.processes if p.role != "etcd" and p.name not in names]
    _UNASSIGNED[node] = (planned, a, out)
    return out


def _rollout_document(rollout: Rollout | None) -> RolloutDocument | None:
    if rollout is None or not (rollout.active or rollout.halted):
        return None
    return RolloutDocument(
        state="halted" if rollout.halted else "updating", reason=rollout.halted,
        roles=[RolloutRole(role=r.role, total=r.total, updated=r.updated, unavailable=r.unavailable,
                           max_unavailable=r.max_unavailable, group=r.group) for r in rollout.roles],
    )


def _process_row(obs: Observed, node: str, proc: ProcessSpec, default_state: str = "pending") -> ProcessRow:
    seen = seen_process(obs, node, proc.name)
    state = default_state
    if node not in obs.members and obs.record is not None and node in obs.record.unmanaged:
        state = "unmanaged"  # what its agent said last, still serving: show its pid
        last = obs.statuses.get(node)
        seen = next((p for p in last.processes if p.name == proc.name), None) if last else None
    elif node not in obs.members:
        state = "lost"
    elif seen is not None:
        state = seen.state.value
        if seen.crash_looping and seen.state != ProcessState.ready and not stopped_on_purpose(seen, proc):
            state = CRASH_LOOPING  # between its failures too: not `running` while it loads to die again
        if seen.spec_hash and seen.spec_hash != proc.spec_hash():
            state += " (old spec)"
    return ProcessRow(
        node=node, name=proc.name, role=proc.role, state=state,
        pid=seen.pid if seen else None, restarts=seen.restarts if seen else 0,
        last_exit_code=seen.last_exit_code if seen else None,
        started_at=seen.started_at if seen else None,
        endpoint=proc.endpoint, dp_rank=proc.dp_rank,
        last_failure=seen.last_failure if seen and seen.failures_in_a_row else None,
    )
