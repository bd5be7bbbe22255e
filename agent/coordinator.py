"""The coordinator: one loop, in every agent, that acts only while it holds the leader key.

Desired state in (spec record + members + status), assignments out. Patroni's rules:
the leader key is taken with `create_revision == 0` under our own lease, refreshed every
cycle, and every write is a transaction that checks we still hold it, so a deposed
coordinator cannot write. When the leader dies its lease expires and another agent's loop
takes the key within about one TTL and carries on from what is in etcd.

The cluster spec's `policy.lease_ttl_s` is asked of the agent's `LeaseState` (registration
moves the member lease onto it) and governs the leader lease from the next election.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from agent.lease import LeaseState
from pdsupervisor.aio.wait import wait_event
from pdsupervisor.core.cluster_view import (
    Desired,
    Observed,
    SpecRecord,
    assigned_roles,
    changes,
    desired_state,
    live_statuses,
)
from pdsupervisor.core.models import NodeAssignment, ProcessStatus
from pdsupervisor.store.cluster import observe, read_record
from pdsupervisor.store.etcd import EVENTS_KEPT, Store, StoreUnavailable, lease_refresh_interval

log = structlog.get_logger("coordinator")


class Coordinator:
    def __init__(self, store: Store, name: str, member_lease: LeaseState, *, events_kept: int = EVENTS_KEPT) -> None:
        self.store = store
        self.name = name
        self.member_lease = member_lease  # every agent follows the spec's lease TTL, leader or not
        self.ttl = member_lease.ttl  # of our leader lease
        self.events_kept = events_kept
        self._events_added = False
        self.lease: int | None = None  # our leader lease (a follower holds one too, to try with)
        self.is_leader = False
        self._last_refresh = 0.0
        self._changed = asyncio.Event()
        self._known_members: set[str] | None = None
        self._known_procs: dict[tuple[str, str], ProcessStatus] = {}
        self._last_phase_note: str | None = None

    @property
    def loop_wait(self) -> float:
        return lease_refresh_interval(self.ttl)

    async def run(self) -> None:
        """Run until cancelled; on cancel, give the leader key up so another takes over at once."""
        watcher = asyncio.create_task(self._watch(), name="coordinator-watch")
        try:
            while True:
                try:
                    await self.cycle()
                except StoreUnavailable as exc:
                    log.warning("etcd unavailable", error=str(exc))
                    self._step_down(None)
                except Exception:  # a bug must not kill the agent that hosts us
                    log.exception("coordinator cycle failed")
                await wait_event(self._changed, self.loop_wait)
                self._changed.clear()
                await asyncio.sleep(0.02)  # let a burst of watch events coalesce into one cycle
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await watcher
            if self.is_leader:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(self.store.release_leader(self.name))
            if self.lease:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(self.store.revoke_lease(self.lease))

    async def _watch(self) -> None:
        """Wake the loop on a change it acts on: any cluster key (events excluded) for the
        leader; for a follower only the leader key (to take over) and the spec (its TTL)."""
        keys = self.store.keys
        while True:
            try:
                rev = await self.store.current_revision()
                async for ev in self.store.watch_prefix(keys.root, rev + 1):
                    if ev.key in (keys.leader, keys.spec) or (self.is_leader and not ev.key.startswith(keys.events)):
                        self._changed.set()
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    def _step_down(self, reason: str | None) -> None:
        if self.is_leader:
            log.warning("lost leadership", reason=reason)
        self.is_leader = False
        self._known_members = None
        self._known_procs = {}

    async def cycle(self) -> None:
        if not self.is_leader:  # a follower reads the spec for its TTL only
            await self._follow_spec_ttl((await read_record(self.store))[0])
        if not await self._hold_leadership():
            return
        obs = await observe(self.store)
        if await self._follow_spec_ttl(obs.record):
            return  # stepped down to take the key again under the new TTL
        await self._record_events(obs)
        desired = desired_state(obs)
        await self._apply(obs, desired)
        if self._events_added:  # also a crash loop's events, which change no assignment
            self._events_added = False
            await self.store.trim_events(self.events_kept)

    async def _event(self, kind: str, message: str, **fields: object) -> None:
        await self.store.append_event(kind, message, **fields)
        self._events_added = True

    async def _follow_spec_ttl(self, record: SpecRecord | None) -> bool:
        """The spec's `policy.lease_ttl_s` sets member leases and, from the next election, ours.

        True when the TTL changed (a leader then hands its key over to take it anew).
        """
        ttl = ((record.spec if record else {}).get("policy") or {}).get("lease_ttl_s")
        if not isinstance(ttl, int) or ttl == self.ttl:
            return False
        self.ttl = ttl
        self.member_lease.ask_ttl(ttl)
        if self.is_leader:  # our lease has the old TTL: hand the key over and take it anew
            await self.store.release_leader(self.name)
            self._step_down("lease TTL changed")
        if self.lease is not None:
            await self.store.revoke_lease(self.lease)
            self.lease = None
        return True

    async def _hold_leadership(self) -> bool:
        now = time.monotonic()
        if self.is_leader:
            if now - self._last_refresh < self.loop_wait:
                return True
            assert self.lease is not None
            if await self.store.refresh_lease(self.lease) > 0:
                self._last_refresh = now
                return True
            self._step_down("lease expired")
            self.lease = None
        if self.lease is None or await self.store.refresh_lease(self.lease) == 0:
            self.lease = await self.store.grant_lease(self.ttl)
        self._last_refresh = time.monotonic()
        if await self.store.acquire_leader(self.name, self.lease):
            self.is_leader = True
            log.info("became leader", node=self.name)
            await self._event("leader", f"{self.name} is the coordinator", node=self.name)
            return True
        return False

    async def _apply(self, obs: Observed, desired: Desired) -> None:
        todo = changes(obs, desired)
        if not todo:
            self._note_missing(desired.missing)
            return
        keys = self.store.keys
        puts: dict[str, NodeAssignment | SpecRecord] = {keys.assignment(n): a for n, a in todo.puts.items()}
        if todo.record is not None:
            puts[keys.spec] = todo.record
        deletes = [keys.assignment(n) for n in todo.deletes]
        # Fenced on the leader key, and on the spec record we decided from: a stop or a
        # replacing spec submitted during this cycle must not be overwritten.
        outcome = await self.store.write_as_leader(self.name, puts, deletes, unchanged={keys.spec: obs.record_revision})
        if outcome == "changed":
            self._changed.set()  # the spec changed under us: decide again from a fresh read
        elif outcome == "deposed":
            self._step_down("fenced: leader key no longer ours")
        else:
            await self._describe_writes(obs, desired)

    def _note_missing(self, missing: list[str]) -> None:
        note = "; ".join(missing)
        if note and note != self._last_phase_note:
            log.info("waiting for members", missing=note)
        self._last_phase_note = note

    async def _describe_writes(self, obs: Observed, desired: Desired) -> None:
        record = obs.record
        before = assigned_roles(obs)
        after = {p.role for a in desired.assignments.values() if a for p in a.processes}
        for role in sorted(after - before):
            message = "proxy released: every engine is ready" if role == "proxy" else f"{role} assigned"
            await self._event("assign", message, role=role)
        for role in sorted(before - after):
            await self._event("unassign", f"{role} removed", role=role)
        new = desired.record
        if record is not None and new is not None and new.placement != record.placement and record.placement:
            await self._event("replan", f"placement now {new.placement}", placement=new.placement)
        if record is not None and new is not None and new.master_epoch != record.master_epoch:
            await self._event(
                "master", f"mooncake master restarted (pid {record.master_pid} -> {new.master_pid}): "
                "restarting the engines, now that it is ready", pid=new.master_pid, epoch=new.master_epoch)

    async def _record_events(self, obs: Observed) -> None:
        members = set(obs.members)
        if self._known_members is None:  # new leader: a node with work but no lease was lost
            for node in sorted(set(obs.assignments) - members):
                await self._event("member", f"{node} lost (lease expired)", node=node)
        else:
            for node in sorted(members - self._known_members):
                await self._event("member", f"{node} joined", node=node)
            for node in sorted(self._known_members - members):
                await self._event("member", f"{node} lost (lease expired)", node=node)
        self._known_members = members
        procs = {(n, p.name): p for n, s in live_statuses(obs).items() for p in s.processes}
        for key, now in procs.items():
            prev = self._known_procs.get(key)
            if prev is None or now.pid is None:
                continue
            if now.restarts > prev.restarts:
                await self._event(
                    "process", f"{key[1]} on {key[0]} restarted (exit code {now.last_exit_code})",
                    node=key[0], process=key[1], exit_code=now.last_exit_code, restarts=now.restarts,
                )
            elif prev.pid is None or (prev.pid != now.pid and now.restarts == prev.restarts):
                await self._event("process", f"{key[1]} on {key[0]} started (pid {now.pid})",
                                              node=key[0], process=key[1], pid=now.pid)
        self._known_procs = procs
