"""Node registration under a lease, refreshed every ttl/3 on the monotonic clock.

A refresh answering 0 means the lease is gone (expired during an outage, or revoked by an
old etcd leader): grant a new one and register again, never panic. While etcd is away the
loop only retries; nothing else in the agent depends on it succeeding.

The lease it holds is published in the shared `LeaseState`; a TTL asked for there (the
cluster spec's) is taken at once: a new lease is granted, the member key moved onto it, and
the old lease revoked, so the member key never disappears in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.lease import LeaseState, store_timeout
from pdsupervisor.aio.wait import wait_event
from pdsupervisor.core.models import NodeFacts
from pdsupervisor.store.etcd import Store, StoreUnavailable, lease_refresh_interval

log = structlog.get_logger("agent.registration")

FACTS_RECHECK_S = 60.0


class Registration:
    def __init__(self, store: Store, facts: Callable[[], NodeFacts], lease: LeaseState) -> None:
        self.store = store
        self.facts = facts
        self.lease = lease
        self.last_refresh_mono: float | None = None
        self._granted_ttl = lease.ttl  # the TTL of the lease we hold
        self._facts_sent: dict[str, Any] | None = None
        self.published: NodeFacts | None = None  # the facts in our member key (GET /status shows them)
        self._facts_checked = 0.0
        self._registered_at = 0.0

    @property
    def healthy(self) -> bool:
        """The lease was confirmed alive within the last ttl."""
        return self.last_refresh_mono is not None and time.monotonic() - self.last_refresh_mono < self.lease.ttl

    def _comparable(self, f: NodeFacts) -> dict[str, Any]:
        return f.model_dump(exclude={"registered_at", "hugepages_free", "lease"})

    async def _publish(self, facts: NodeFacts, lease: int) -> None:
        member = facts.model_copy(update={"registered_at": self._registered_at, "lease": lease})
        await self.store.register_member(member, lease)
        self.published = member
        self._facts_sent = self._comparable(facts)
        self._facts_checked = time.monotonic()

    async def _register(self) -> None:
        ttl = self.lease.ttl
        self.store.timeout_s = store_timeout(ttl)  # etcd calls follow the TTL they must fit in
        lease = await self.store.grant_lease(ttl)
        self._registered_at = time.time()
        await self._publish(self.facts(), lease)
        self._granted_ttl = ttl
        self.lease.registered_under(lease)
        self.last_refresh_mono = time.monotonic()
        log.info("registered", lease=hex(lease), ttl=ttl)

    async def _maybe_update_facts(self, lease: int) -> None:
        if time.monotonic() - self._facts_checked < FACTS_RECHECK_S:
            return
        self._facts_checked = time.monotonic()
        facts = self.facts()
        if self._comparable(facts) != self._facts_sent:
            await self._publish(facts, lease)
            log.info("node facts updated")

    async def run(self) -> None:
        delay = 0.25
        while True:
            self.lease.ttl_asked.clear()  # whatever it asks now is taken below
            period = lease_refresh_interval(self.lease.ttl)
            held = self.lease.lease_id
            try:
                if held is None:
                    await self._register()
                elif self._granted_ttl != self.lease.ttl:
                    await self._register()
                    await self.store.revoke_lease(held)
                else:
                    left = await self.store.refresh_lease(held)
                    if left <= 0:
                        log.warning("lease lost, registering again", lease=hex(held))
                        self.lease.lost()
                        continue
                    self.last_refresh_mono = time.monotonic()
                    await self._maybe_update_facts(held)
                delay = 0.25
                await wait_event(self.lease.ttl_asked, period)
            except StoreUnavailable as exc:
                log.warning("etcd unavailable, retrying", error=str(exc) or type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, period)
