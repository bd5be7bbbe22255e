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

from dataclasses import dataclass

from pdsupervisor.core.node_engines import NODE_ENGINES
from pdsupervisor.core.observed import Observed, observed_process
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


def plan_rollout(obs: Observed, plan: Plan, spec: ClusterSpec, now: float | None = None) -> Rollout:
    """Which outdated engines take their planned spec this cycle (see the module docstring).
    Summed from each node's answers (`core.node_engines`), kept while the node's keys are unchanged."""
    nodes = NODE_ENGINES.of_plan(obs, plan, now)
    roles: list[RoleRollout] = []
    allowed: set[tuple[str, str]] = set()
    waves: set[tuple[str, str]] = set()  # what waves of single engines would change
    for role in ENGINE_ROLES:
        group = role == "decode" and plan.dp_size > 1
        total = updated = unavailable = 0
        outdated_up: list[tuple[str, str]] = []
        outdated_down: list[tuple[str, str]] = []
        for n in nodes:
            r = n.roles[role]
            total += r.total
            updated += r.updated
            unavailable += r.unavailable
            outdated_up += r.outdated_up
            outdated_down += r.outdated_down
        limit = spec.policy.rollout.max_unavailable(role, total)
        if group:
            may = set(outdated_up + outdated_down)  # its ranks start together: one wave
        else:
            room = max(0, limit - unavailable)
            may = set(outdated_down) | set(outdated_up[:room])
        roles.append(RoleRollout(role=role, total=total, updated=updated, unavailable=unavailable,
                                 max_unavailable=limit, group=group))
        # a DP group is one wave, no canary before it: a halt does not hold it (its own failure
        # or refusal keeps the old ranks where a node refused, and a group restart must pass)
        (allowed if group else waves).update(may)
    # A halt is judged while a rollout goes on (engines still to change) or a node refused a
    # new spec (its old process runs on): a crash loop at rest is a problem, not a halt.
    active = any(r.updated < r.total for r in roles)
    halted = next((f"rollout halted: {why}" for n in nodes for why in n.failures
                   if active or "refused by its node" in why), None)
    if halted is None:
        allowed |= waves
    return Rollout(roles=tuple(roles), allowed=frozenset(allowed), halted=halted)


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
