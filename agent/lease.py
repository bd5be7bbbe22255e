"""The agent's member lease: one object shared by the loops that need it, instead of callbacks.

Registration writes it (`registered_under`, `lost`); the reconciler reports status under
`lease_id` and writes it again under each new lease (`next_lease`); the coordinator asks for
the cluster spec's TTL (`ask_ttl`) and registration follows it at once (`ttl_asked`).
"""

from __future__ import annotations

import asyncio

from pdsupervisor.store.etcd import lease_refresh_interval


def store_timeout(ttl: int) -> float:
    """Per-call etcd timeout: a refresh every ttl/3 plus two timed-out calls still fit in the
    TTL (Patroni's `loop_wait + 2 * retry_timeout <= ttl`)."""
    return min(3.0, lease_refresh_interval(ttl))


class LeaseState:
    def __init__(self, ttl: int) -> None:
        self.ttl = ttl  # what the member lease is granted with: the config's, then the spec's
        self.lease_id: int | None = None  # None while unregistered, or after the lease was lost
        self.registered = asyncio.Event()  # set at the first registration, never cleared
        self.ttl_asked = asyncio.Event()  # registration's wake-up (it clears it): `ttl` changed
        self._new_lease = asyncio.Event()  # set and replaced at each registration: wakes every waiter

    def ask_ttl(self, ttl: int) -> None:
        """Take the cluster spec's TTL (`policy.lease_ttl_s`) over the configured one."""
        if ttl != self.ttl:
            self.ttl = ttl
            self.ttl_asked.set()

    def registered_under(self, lease_id: int) -> None:
        self.lease_id = lease_id
        self.registered.set()
        self._new_lease.set()
        self._new_lease = asyncio.Event()

    def lost(self) -> None:
        self.lease_id = None

    async def next_lease(self, seen: int | None) -> int:
        """The lease once there is one other than `seen` (at once when there already is)."""
        while self.lease_id is None or self.lease_id == seen:
            await self._new_lease.wait()
        return self.lease_id
