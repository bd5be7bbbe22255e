"""Node registration under a lease, refreshed every ttl/3 on the monotonic clock.

A refresh answering 0 means the lease is gone (expired during an outage, or revoked by an
old etcd leader): grant a new one and register again, never panic. While etcd is away the
loop only retries; nothing else in the agent depends on it succeeding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from pdsupervisor.core.models import NodeFacts
from pdsupervisor.store.etcd import Store, StoreUnavailable, lease_refresh_interval

log = structlog.get_logger("agent.registration")

FACTS_RECHECK_S = 60.0


class Registration:
    def __init__(
        self,
        store: Store,
        facts: Callable[[], NodeFacts],
        ttl: int,
        on_registered: Callable[[int], None] = lambda lease: None,
    ) -> None:
        self.store = store
        self.facts = facts
        self.ttl = ttl
        self.on_registered = on_registered
        self.lease_id: int | None = None
        self.registered = asyncio.Event()  # set once, at the first registration
        self.last_refresh_mono: float | None = None
        self._facts_sent: dict | None = None
        self._facts_checked = 0.0
        self._ttl_changed = False
        self._registered_at = 0.0

    def set_ttl(self, ttl: int) -> None:
        """Take the cluster spec's TTL (`policy.lease_ttl_s`) over the configured one.

        Applied at the next refresh: a new lease is granted, the member key moved onto it,
        and the old lease revoked, so the member key never disappears in between.
        """
        if ttl != self.ttl:
            self.ttl = ttl
            self._ttl_changed = True

    @property
    def healthy(self) -> bool:
        """The lease was confirmed alive within the last ttl."""
        return self.last_refresh_mono is not None and time.monotonic() - self.last_refresh_mono < self.ttl

    def _comparable(self, f: NodeFacts) -> dict:
        return f.model_dump(exclude={"registered_at", "hugepages_free", "lease"})

    async def _publish(self, facts: NodeFacts, lease: int) -> None:
        await self.store.register_member(
            facts.model_copy(update={"registered_at": self._registered_at, "lease": lease}), lease)
        self._facts_sent = self._comparable(facts)
        self._facts_checked = time.monotonic()

    async def _register(self) -> None:
        lease = await self.store.grant_lease(self.ttl)
        self._registered_at = time.time()
        await self._publish(self.facts(), lease)
        self.lease_id = lease
        self.last_refresh_mono = time.monotonic()
        log.info("registered", lease=hex(lease), ttl=self.ttl)
        self.registered.set()
        self.on_registered(lease)

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
            period = lease_refresh_interval(self.ttl)
            try:
                if self.lease_id is None:
                    await self._register()
                elif self._ttl_changed:
                    old = self.lease_id
                    await self._register()
                    self._ttl_changed = False
                    await self.store.revoke_lease(old)
                else:
                    left = await self.store.refresh_lease(self.lease_id)
                    if left <= 0:
                        log.warning("lease lost, registering again", lease=hex(self.lease_id))
                        self.lease_id = None
                        continue
                    self.last_refresh_mono = time.monotonic()
                    await self._maybe_update_facts(self.lease_id)
                delay = 0.25
                await asyncio.sleep(period)
            except StoreUnavailable as exc:
                log.warning("etcd unavailable, retrying", error=str(exc) or type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, period)
