"""Control-plane operations on etcd, shared by the REST handlers and the coordinator.

Writes here are desired state only (the spec record); the coordinator turns it into
assignments. Every etcd call still goes through `Store`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from pdsupervisor.cluster_view import Observed, SpecRecord
from pdsupervisor.spec import ClusterSpec
from pdsupervisor.store import Store


async def read_record(store: Store) -> tuple[SpecRecord | None, int]:
    """The spec record and the mod revision it was read at (0: absent), for a later CAS."""
    kv = await store.get(store.keys.spec)
    return (SpecRecord.model_validate_json(kv.value), kv.mod_revision) if kv else (None, 0)


async def observe(store: Store) -> Observed:
    """Read everything the view needs, concurrently."""
    (record, revision), members, assignments, statuses = await asyncio.gather(
        read_record(store), store.members(), store.assignments(), store.statuses()
    )
    return Observed(record=record, members=members, assignments=assignments, statuses=statuses,
                    record_revision=revision)


@dataclass
class SubmitResult:
    status: int  # HTTP-like: 202 accepted, 409 conflict
    generation: int
    message: str = ""


async def submit_spec(store: Store, spec: ClusterSpec, *, replace: bool = False) -> SubmitResult:
    """Record `spec` to run. Another spec already running is a conflict unless `replace`.

    Compare-and-swap on the record's revision, so two concurrent submits cannot both win.
    """
    for _ in range(5):
        current, revision = await read_record(store)
        spec_doc = spec.model_dump(mode="json")
        if current is not None and current.action == "start" and not replace:
            if _same(current.spec, spec_doc):
                return SubmitResult(202, current.generation, "already running")
            return SubmitResult(
                409, current.generation,
                f"cluster {spec.cluster} is running generation {current.generation} of another spec; "
                "stop it first or ask to replace it",
            )
        keep_placement = current is not None and current.action == "start" and _same_roles(current.spec, spec_doc)
        record = SpecRecord(
            generation=(current.generation if current else 0) + 1, action="start", spec=spec_doc,
            placement=current.placement if keep_placement and current else {}, submitted_at=time.time(),
            # a replacing spec keeps the master's identity: engines restart only if their spec changed
            master_pid=current.master_pid if current and current.action == "start" else None,
            master_epoch=current.master_epoch if current else 0,
        )
        if await store.put_spec_record(record.model_dump(mode="json"), expect_mod_revision=revision):
            await store.append_event("spec", f"generation {record.generation} submitted", generation=record.generation)
            return SubmitResult(202, record.generation)
    return SubmitResult(409, 0, "the spec changed concurrently; try again")


async def request_stop(store: Store) -> SubmitResult:
    for _ in range(5):
        current, revision = await read_record(store)
        if current is None:
            return SubmitResult(202, 0, "nothing to stop")
        if current.action == "stop":
            return SubmitResult(202, current.generation, "already stopping")
        record = current.model_copy(update={"action": "stop"})
        if await store.put_spec_record(record.model_dump(mode="json"), expect_mod_revision=revision):
            await store.append_event("spec", f"stop of generation {record.generation} requested",
                                     generation=record.generation)
            return SubmitResult(202, record.generation)
    return SubmitResult(409, 0, "the spec changed concurrently; try again")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _same_roles(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Placement survives a replacing spec only when the role layout is unchanged."""
    keys = ("prefill", "decode")
    return all(
        {k: (a.get(r) or {}).get(k) for k in ("nodes", "node_names", "labels")}
        == {k: (b.get(r) or {}).get(k) for k in ("nodes", "node_names", "labels")}
        for r in keys
    )
