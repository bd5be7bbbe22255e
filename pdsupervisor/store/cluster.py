"""Control-plane operations on etcd, shared by the REST handlers and the coordinator.

Writes here are desired state only (the spec record); the coordinator turns it into
assignments. Every etcd call still goes through `Store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus
from pdsupervisor.core.observed import Observed, SpecRecord
from pdsupervisor.core.spec import ClusterSpec
from pdsupervisor.store.etcd import Store
from pdsupervisor.store.gateway import decode_models


async def read_record(store: Store) -> tuple[SpecRecord | None, int]:
    """The spec record and the mod revision it was read at (0: absent), for a later CAS."""
    kv = await store.get(store.keys.spec)
    return (SpecRecord.model_validate_json(kv.value), kv.mod_revision) if kv else (None, 0)


async def observe(store: Store) -> Observed:
    """Everything the view needs, in one etcd transaction: every part at one revision."""
    keys = store.keys
    read, revision = await store.snapshot(keys=(keys.spec, keys.leader),
                                          prefixes=(keys.members, keys.assignments, keys.status))
    spec, leader = read[keys.spec], read[keys.leader]
    return Observed(
        record=SpecRecord.model_validate_json(spec[0].value) if spec else None,
        members=decode_models(read[keys.members], keys.members, NodeFacts),
        assignments=decode_models(read[keys.assignments], keys.assignments, NodeAssignment),
        statuses=decode_models(read[keys.status], keys.status, NodeStatus),
        record_revision=spec[0].mod_revision if spec else 0,
        revision=revision,
        leader=leader[0].value.decode() if leader else None,
    )


@dataclass(frozen=True)
class Membership:
    """What routing needs, read at one revision: who is registered, what each node's agent last
    said, and what the coordinator plans on each node."""

    members: dict[str, NodeFacts]
    statuses: dict[str, NodeStatus]
    assignments: dict[str, NodeAssignment]
    revision: int  # watch from the next one to miss nothing


async def observe_membership(store: Store) -> Membership:
    """Members, node statuses and assignments in one transaction."""
    keys = store.keys
    read, revision = await store.snapshot(prefixes=(keys.members, keys.status, keys.assignments))
    return Membership(members=decode_models(read[keys.members], keys.members, NodeFacts),
                      statuses=decode_models(read[keys.status], keys.status, NodeStatus),
                      assignments=decode_models(read[keys.assignments], keys.assignments, NodeAssignment),
                      revision=revision)


async def observe_nodes(store: Store) -> tuple[dict[str, NodeFacts], str | None]:
    """The registered members and the coordinator's name, at one revision (`GET /nodes`)."""
    keys = store.keys
    read, _ = await store.snapshot(keys=(keys.leader,), prefixes=(keys.members,))
    leader = read[keys.leader]
    return decode_models(read[keys.members], keys.members, NodeFacts), leader[0].value.decode() if leader else None


# What a replacing spec's record keeps from the running one (see `SpecRecord`).
CARRIED = ("group_epoch", "group_since", "group_restarts", "group_reason", "unmanaged", "recently_lost")


@dataclass
class SubmitResult:
    status: int  # HTTP-like: 202 accepted, 409 conflict
    generation: int
    message: str = ""
    impact: list[str] = field(default_factory=list)  # see `SubmitAnswer.impact`


# What to do with the current record: a new record to write (and the event that says so),
# or the answer as it stands.
Decision = tuple[SpecRecord, str] | SubmitResult


async def _change_record(store: Store, decide: Callable[[SpecRecord | None], Decision]) -> SubmitResult:
    """Read, decide, write only if nobody wrote the record meanwhile (CAS on its revision,
    so two concurrent requests cannot both win); retry a few times on a race."""
    for _ in range(5):
        current, revision = await read_record(store)
        decision = decide(current)
        if isinstance(decision, SubmitResult):
            return decision
        record, event = decision
        if await store.put_spec_record(record.model_dump(mode="json"), expect_mod_revision=revision):
            await store.append_event("spec", event, generation=record.generation)
            return SubmitResult(202, record.generation)
    return SubmitResult(409, 0, "the spec changed concurrently; try again")


async def submit_spec(store: Store, spec: ClusterSpec, *, replace: bool = False) -> SubmitResult:
    """Record `spec` to run. Another spec already running is a conflict unless `replace`."""
    spec_doc = spec.model_dump(mode="json")

    def decide(current: SpecRecord | None) -> Decision:
        running = current if current is not None and current.action == "start" else None
        if running is not None and not replace:
            if running.spec == spec_doc:
                return SubmitResult(202, running.generation, "already running")
            return SubmitResult(
                409, running.generation,
                f"cluster {spec.cluster} is running generation {running.generation} of another spec; "
                "stop it first or ask to replace it",
            )
        keep_placement = running is not None and _same_roles(running.spec, spec_doc)
        record = SpecRecord(
            generation=(current.generation if current else 0) + 1, action="start", spec=spec_doc,
            placement=running.placement if running is not None and keep_placement else {},
            submitted_at=time.time(),
            # a replacing spec keeps the master's identity and the DP group's epoch (both in
            # the engines' specs): engines restart only if their spec changed; and what the
            # coordinator knows of nodes away
            master_pid=running.master_pid if running is not None else None,
            master_epoch=current.master_epoch if current else 0,
            **({k: getattr(running, k) for k in CARRIED} if running is not None else {}),
        )
        return record, f"generation {record.generation} submitted"

    return await _change_record(store, decide)


async def request_stop(store: Store) -> SubmitResult:
    def decide(current: SpecRecord | None) -> Decision:
        if current is None:
            return SubmitResult(202, 0, "nothing to stop")
        if current.action == "stop":
            return SubmitResult(202, current.generation, "already stopping")
        return current.model_copy(update={"action": "stop"}), f"stop of generation {current.generation} requested"

    return await _change_record(store, decide)


def _same_roles(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Placement survives a replacing spec only when the role layout is unchanged."""
    keys = ("prefill", "decode")
    return all(
        {k: (a.get(r) or {}).get(k) for k in ("nodes", "node_names", "labels")}
        == {k: (b.get(r) or {}).get(k) for k in ("nodes", "node_names", "labels")}
        for r in keys
    )
