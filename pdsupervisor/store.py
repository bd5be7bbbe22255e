"""Every etcd call of pdsupervisor lives here, so the client library can be swapped.

The key layout (one cluster under one prefix)::

    /pdsupervisor/<cluster>/spec                 cluster spec record (JSON) with its generation
    /pdsupervisor/<cluster>/members/<node>       NodeFacts, under the agent's lease
    /pdsupervisor/<cluster>/leader               coordinator's name, under its lease
    /pdsupervisor/<cluster>/assignments/<node>   NodeAssignment, written only by the leader
    /pdsupervisor/<cluster>/status/<node>        NodeStatus, written by the node's agent
    /pdsupervisor/<cluster>/events/<seq>         bounded event log, for people
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdError
from etcd3aio.kv import KVService, prefix_range_end
from pydantic import BaseModel

from pdsupervisor.models import NodeAssignment, NodeFacts, NodeStatus

M = TypeVar("M", bound=BaseModel)

class WatchLost(ConnectionError):
    """The server ended a watch: read again, then watch from the new revision."""


# Errors a caller treats as "etcd is away for now": retry later, touch nothing.
StoreUnavailable: tuple[type[BaseException], ...] = (
    EtcdError,
    grpc.aio.AioRpcError,
    asyncio.TimeoutError,
    ConnectionError,
)

DEFAULT_TIMEOUT_S = 3.0
EVENTS_KEPT = 500


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    key: str
    value: bytes | None  # None for a delete
    revision: int


class Keys:
    """Key names of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.root = f"/pdsupervisor/{cluster}/"
        self.spec = self.root + "spec"
        self.leader = self.root + "leader"
        self.members = self.root + "members/"
        self.assignments = self.root + "assignments/"
        self.status = self.root + "status/"
        self.events = self.root + "events/"

    def member(self, node: str) -> str:
        return self.members + node

    def assignment(self, node: str) -> str:
        return self.assignments + node

    def node_status(self, node: str) -> str:
        return self.status + node


def _dump(model: BaseModel | Mapping[str, Any]) -> bytes:
    if isinstance(model, BaseModel):
        return model.model_dump_json().encode()
    return json.dumps(model, sort_keys=True).encode()


def parse_endpoint(url: str) -> str:
    """`http://10.0.0.1:2379` or `10.0.0.1:2379` -> `10.0.0.1:2379` (what gRPC wants)."""
    return url.split("://", 1)[-1].rstrip("/")


class Store:
    """One cluster's view of etcd: typed reads and writes, leases, fenced leader writes."""

    def __init__(self, endpoints: list[str], cluster: str, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.cluster = cluster
        self.keys = Keys(cluster)
        self.timeout_s = timeout_s
        self._client = Etcd3Client(
            self.endpoints, rpc_max_attempts=2, watch_max_reconnect_backoff_seconds=2.0
        )
        self._connected = False

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if not self._connected:
            await self._client.connect()
            self._connected = True

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self._client.close()

    @property
    def _kv(self) -> KVService:
        if self._client.kv is None:
            raise ConnectionError("not connected to etcd yet")
        return self._client.kv

    # ---- raw key/value -------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._kv.get(key, timeout=self.timeout_s)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix` and the store revision they were read at."""
        resp = await self._kv.get(prefix, range_end=prefix_range_end(prefix), timeout=self.timeout_s)
        return [_kv(kv) for kv in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._kv.put(key, value, lease=lease, timeout=self.timeout_s)
        return resp.header.revision

    async def delete(self, key: str) -> None:
        await self._kv.delete(key, timeout=self.timeout_s)

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` from `start_revision` on (read once, then watch from rev+1)."""
        async for resp in self._client.watch.watch(  # type: ignore[union-attr]
            prefix, range_end=prefix_range_end(prefix), start_revision=start_revision
        ):
            if resp.canceled or resp.compact_revision > 0:
                # The server ended this watch (e.g. our revision was compacted away) but may
                # keep the stream open: end it here, so the caller re-reads and re-watches.
                raise WatchLost(f"watch on {prefix} canceled (compacted to {resp.compact_revision})")
            for ev in resp.events:
                deleted = ev.type == 1  # mvccpb.Event.DELETE
                yield WatchEvent(
                    key=ev.kv.key.decode(),
                    value=None if deleted else ev.kv.value,
                    revision=ev.kv.mod_revision,
                )

    async def compact(self, revision: int) -> None:
        """Drop history before `revision` (etcd's auto-compaction does this on a schedule)."""
        await self._kv.compact(revision, timeout=self.timeout_s)

    async def current_revision(self) -> int:
        resp = await self._kv.get(self.keys.root, count_only=True, timeout=self.timeout_s)
        return resp.header.revision

    # ---- leases --------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._client.lease.grant(ttl=ttl, timeout=self.timeout_s)  # type: ignore[union-attr]
        return resp.ID

    async def refresh_lease(self, lease_id: int) -> int:
        """Send one keep-alive; the remaining TTL, or 0 when the lease is gone."""
        stream = self._client.lease.keep_alive(lease_id)  # type: ignore[union-attr]
        try:
            async with asyncio.timeout(self.timeout_s):
                async for resp in stream:
                    return max(0, resp.TTL)
        finally:
            stream.cancel()
        return 0

    async def lease_granted_ttl(self, lease_id: int) -> int:
        """The TTL a lease was granted with (0 when it no longer exists)."""
        resp = await self._client.lease.time_to_live(lease_id, timeout=self.timeout_s)  # type: ignore[union-attr]
        return max(0, resp.grantedTTL) if resp.TTL > 0 else 0

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(*StoreUnavailable):
            await self._client.lease.revoke(lease_id, timeout=self.timeout_s)  # type: ignore[union-attr]

    # ---- typed cluster records ------------------------------------------------------

    async def get_model(self, key: str, model: type[M]) -> M | None:
        kv = await self.get(key)
        return model.model_validate_json(kv.value) if kv else None

    async def get_models(self, prefix: str, model: type[M]) -> dict[str, M]:
        kvs, _ = await self.get_prefix(prefix)
        return {kv.key[len(prefix):]: model.model_validate_json(kv.value) for kv in kvs}

    async def register_member(self, facts: NodeFacts, lease_id: int) -> None:
        await self.put(self.keys.member(facts.name), _dump(facts), lease=lease_id)

    async def members(self) -> dict[str, NodeFacts]:
        return await self.get_models(self.keys.members, NodeFacts)

    async def assignment(self, node: str) -> NodeAssignment | None:
        return await self.get_model(self.keys.assignment(node), NodeAssignment)

    async def assignments(self) -> dict[str, NodeAssignment]:
        return await self.get_models(self.keys.assignments, NodeAssignment)

    async def put_status(self, status: NodeStatus) -> None:
        await self.put(self.keys.node_status(status.node), _dump(status))

    async def statuses(self) -> dict[str, NodeStatus]:
        return await self.get_models(self.keys.status, NodeStatus)

    async def spec_record(self) -> dict[str, Any] | None:
        kv = await self.get(self.keys.spec)
        return json.loads(kv.value) if kv else None

    async def put_spec_record(self, record: Mapping[str, Any], *, expect_mod_revision: int | None = None) -> bool:
        """Write the spec record; with `expect_mod_revision`, only if nobody wrote it since."""
        if expect_mod_revision is None:
            await self.put(self.keys.spec, _dump(record))
            return True
        resp = await self._kv.txn(
            [_compare_mod_revision(self.keys.spec, expect_mod_revision)],
            [KVService.txn_op_put(self.keys.spec, _dump(record))],
            timeout=self.timeout_s,
        )
        return bool(resp.succeeded)

    # ---- leader election and fenced writes -------------------------------------------

    async def leader(self) -> str | None:
        kv = await self.get(self.keys.leader)
        return kv.value.decode() if kv else None

    async def acquire_leader(self, name: str, lease_id: int) -> bool:
        """Take the leader key if nobody holds it (create_revision == 0), or keep it if it is
        already ours under this very lease (e.g. after one failed cycle made us step down).

        The failure branch reads the key in the same transaction: trust our own CAS, not a
        separate read.
        """
        resp = await self._kv.txn(
            [KVService.txn_compare_create_revision(self.keys.leader, 0)],
            [KVService.txn_op_put(self.keys.leader, name, lease=lease_id)],
            [KVService.txn_op_get(self.keys.leader)],
            timeout=self.timeout_s,
        )
        if resp.succeeded:
            return True
        held = resp.responses[0].response_range.kvs if resp.responses else []
        return bool(held) and held[0].value == name.encode() and held[0].lease == lease_id

    async def release_leader(self, name: str) -> None:
        with contextlib.suppress(*StoreUnavailable):
            await self._kv.txn(
                [KVService.txn_compare_value(self.keys.leader, name)],
                [KVService.txn_op_delete(self.keys.leader)],
                timeout=self.timeout_s,
            )

    async def write_as_leader(
        self,
        name: str,
        puts: Mapping[str, bytes | BaseModel | Mapping[str, Any]],
        deletes: list[str] = (),  # type: ignore[assignment]
        *,
        unchanged: Mapping[str, int] | None = None,
    ) -> bool:
        """Apply puts and deletes in one transaction, only while `name` holds the leader key
        and every key in `unchanged` still has the mod revision it was read at (0: absent).

        False means the write did not happen: we are no longer the leader, or what the
        decision was based on changed meanwhile (`is_leader` tells which).
        """
        ops = [
            KVService.txn_op_put(k, v if isinstance(v, bytes) else _dump(v)) for k, v in puts.items()
        ] + [KVService.txn_op_delete(k) for k in deletes]
        compare = [KVService.txn_compare_value(self.keys.leader, name)]
        compare += [_compare_mod_revision(k, rev) for k, rev in (unchanged or {}).items()]
        resp = await self._kv.txn(compare, ops, timeout=self.timeout_s)
        return bool(resp.succeeded)

    async def is_leader(self, name: str) -> bool:
        return await self.leader() == name

    # ---- events ----------------------------------------------------------------------

    async def append_event(self, kind: str, message: str, **fields: Any) -> None:
        """Record an event for people. Keys sort by time; old ones are trimmed."""
        event = {"ts": time.time(), "kind": kind, "message": message, **fields}
        key = f"{self.keys.events}{time.time_ns():020d}"
        await self.put(key, _dump(event))

    async def events(self, limit: int = 100) -> list[dict[str, Any]]:
        kvs, _ = await self.get_prefix(self.keys.events)
        return [json.loads(kv.value) for kv in kvs[-limit:]]

    async def trim_events(self, keep: int = EVENTS_KEPT) -> None:
        kvs, _ = await self.get_prefix(self.keys.events)
        for kv in kvs[:-keep] if len(kvs) > keep else []:
            await self.delete(kv.key)


def _compare_mod_revision(key: str, revision: int):  # type: ignore[no-untyped-def]
    from etcd3aio._protobuf import Compare

    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key.encode(), mod_revision=revision)


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=kv.value,
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        lease=kv.lease,
    )
