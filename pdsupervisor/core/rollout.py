"""Rolling, canaried changes of running engines: which engines may take their new spec now.

A replacing spec, or a restart forced by a Mooncake master restart (a new epoch in every
engine's spec), changes running engines. All at once would empty a role; instead, per role,
at most `policy.rollout.max_unavailable` engines are not ready at a time (Kubernetes'
RollingUpdate with no surge): an outdated engine takes its new spec only while the role's
engines that are not ready leave room. One that is down anyway (crashed, never ready) takes
it at once: that costs no availability. A decode DP group (DP size > 1) is one unit: its
ranks must start together, so the whole group changes in one wave.

Each wave is a canary for the next: when an engine already running its new spec fails
(refused by its node before anything was stopped, a spawn error, a crash loop, or not ready
within its start timeout), the rollout halts. Nothing more changes; the engines still on the
old spec keep serving; the reason goes to `status`, `events` and `start --wait`. A newer spec
(a fix, or the old one back) starts a new rollout: the halt is judged against the current
plan only.

Pure: (observation, plan, spec, now) in, a `Rollout` out. The coordinator assigns what it
allows; `GET /cluster` shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdsupervisor.core.models import ProcessSpec, ProcessState, same_spec
from pdsupervisor.core.observed import Observed, assigned_spec, is_ready, observed_process
from pdsupervisor.core.planner import ENGINE_ROLES, Plan
from pdsupervisor.core.spec import ClusterSpec


@dataclass(frozen=True)
class RoleRollout:
    """One role's progress: how many engines run their planned spec, how many are not ready."""

    role: str
    total: int
    updated: int  # assigned their planned spec
    unavailable: int  # not ready with what they are assigned
    max_unavailable: int
    group: bool  # a DP group: changes as one unit


@dataclass(frozen=True)
class Rollout:
    roles: tuple[RoleRollout, ...]
    allowed: frozenset[tuple[str, str]]  # (node, process) of outdated engines that take their new spec now
    halted: str | None = None  # why nothing more changes

    @property
    def active(self) -> bool:
        """Engines still to change (or changed and not ready yet)."""
        return any(r.updated < r.total for r in self.roles)


def failure(obs: Observed, node: str, planned: ProcessSpec, now: float | None) -> str | None:
    """Why an engine assigned `planned` failed to take it, or None (fine, or not known yet).
    Stable words (no counts, no ages): the halt event is told once, not at every change."""
    seen = observed_process(obs, node, planned.name)
    if seen is None:
        return None
    where = f"{planned.name} on {node}"
    new_hash = planned.spec_hash()
    if seen.refused_spec_hash == new_hash:  # refused by its node; the old process still runs
        return f"{where}: refused by its node: {seen.refused}"
    if seen.spec_hash != new_hash:
        return None  # still stopping the old one
    if seen.state == ProcessState.failed:
        return f"{where}: {seen.message or seen.last_failure or 'failed'}"
    if seen.state == ProcessState.ready:
        return None
    last = seen.last_failure or ""
    if seen.failures_in_a_row and last.startswith("spawn failed"):
        return f"{where}: {last}"
    if seen.crash_looping:
        return f"{where}: crash loop, last: {last}"
    timeout = planned.start_timeout_s
    never_ready = seen.ready_after_s is None  # in this run: one that served and then lost readiness did start
    if now is not None and timeout and never_ready and seen.started_at and now - seen.started_at > timeout:
        return f"{where}: not ready within its start_timeout_s ({timeout:g} s)"
    return None


def plan_rollout(obs: Observed, plan: Plan, spec: ClusterSpec, now: float | None = None) -> Rollout:
    """Which outdated engines take their planned spec this cycle (see the module docstring)."""
    by_role: dict[str, list[tuple[str, ProcessSpec]]] = {r: [] for r in ENGINE_ROLES}
    for node, proc in plan.engines():
        by_role[proc.role].append((node, proc))
    roles: list[RoleRollout] = []
    allowed: set[tuple[str, str]] = set()
    waves: set[tuple[str, str]] = set()  # what waves of single engines would change
    for role, engines in by_role.items():
        group = role == "decode" and plan.dp_size > 1
        limit = spec.policy.rollout.max_unavailable(role, len(engines))
        role_rollout, may = _role(obs, role, engines, limit, group=group)
        roles.append(role_rollout)
        # a DP group is one wave, no canary before it: a halt does not hold it (its own failure
        # or refusal keeps the old ranks where a node refused, and a group restart must pass)
        (allowed if group else waves).update(may)
    # A halt is judged while a rollout goes on (engines still to change) or a node refused a
    # new spec (its old process runs on): a crash loop at rest is a problem, not a halt.
    active = any(r.updated < r.total for r in roles)
    halted = next((f"rollout halted: {why}" for node, proc in plan.engines()
                   if _holds(obs, node, proc) and (why := failure(obs, node, proc, now))
                   and (active or "refused by its node" in why)), None)
    if halted is None:
        allowed |= waves
    return Rollout(roles=tuple(roles), allowed=frozenset(allowed), halted=halted)


def _holds(obs: Observed, node: str, proc: ProcessSpec) -> bool:
    held = assigned_spec(obs, node, proc.name)
    return held is not None and same_spec(held, proc)


def _role(obs: Observed, role: str, engines: Sequence[tuple[str, ProcessSpec]], limit: int, *,
          group: bool) -> tuple[RoleRollout, set[tuple[str, str]]]:
    updated = 0
    unavailable = 0
    outdated_up: list[tuple[str, str]] = []
    outdated_down: list[tuple[str, str]] = []
    for node, proc in engines:
        held = assigned_spec(obs, node, proc.name)
        current = held or proc  # a new engine is assigned its planned spec at once
        ready = is_ready(obs, node, current)
        unavailable += not ready
        if held is None or same_spec(held, proc):
            updated += 1
        else:
            (outdated_up if ready else outdated_down).append((node, proc.name))
    if group:
        may = set(outdated_up + outdated_down)  # its ranks start together: one wave
    else:
        room = max(0, limit - unavailable)
        may = set(outdated_down) | set(outdated_up[:room])
    return RoleRollout(role=role, total=len(engines), updated=updated, unavailable=unavailable,
                       max_unavailable=limit, group=group), may


def how_roles_change(plan: Plan, spec: ClusterSpec) -> list[str]:
    """How a change of this plan's engines would roll, per role (what `plan` says beforehand)."""
    notes = []
    for role in ENGINE_ROLES:
        count = sum(1 for _, p in plan.engines() if p.role == role)
        if not count:
            continue
        if role == "decode" and plan.dp_size > 1:
            timeout = spec.decode.readiness.start_timeout_s
            notes.append(f"decode: one DP group of {plan.dp_size} ranks: a change restarts it as one unit, with no "
                         f"decode until every rank is ready again (a start is given up to {timeout:g} s)")
        else:
            limit = spec.policy.rollout.max_unavailable(role, count)
            notes.append(f"{role}: {count} engines change in waves, at most {limit} not ready at a time")
    return notes


def impact(obs: Observed, plan: Plan, rollout: Rollout) -> list[str]:
    """What changing the running engines to `plan` costs serving, said before it starts: the
    waves per role, and for a decode DP group the gap its last start suggests."""
    notes = []
    for r in rollout.roles:
        outdated = r.total - r.updated
        if not outdated:
            continue
        if not r.group:
            notes.append(f"{r.role}: {outdated} running engines change in waves, at most {r.max_unavailable} "
                         "not ready at a time")
            continue
        ranks = [(node, proc) for node, proc in plan.engines() if proc.role == r.role]
        took = [seen.ready_after_s for node, proc in ranks
                if (seen := observed_process(obs, node, proc.name)) is not None and seen.ready_after_s is not None]
        start = (f"start again (about {max(took):.0f} s, as its slowest rank took last time)" if took
                 else "start again")
        drain = max((proc.drain.timeout_s for _, proc in ranks if proc.drain), default=0.0)
        drained = f"drain (at most {drain:g} s) and " if drain else ""
        notes.append(f"{r.role}: the DP group of {r.total} ranks restarts as one unit: no {r.role} while its ranks "
                     f"{drained}{start}")
    return notes
