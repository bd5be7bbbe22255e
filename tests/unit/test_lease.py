"""The member lease shared by registration, the reconciler and the coordinator."""

from __future__ import annotations

import asyncio

from agent.lease import LeaseState


async def test_next_lease_is_at_once_when_there_is_another_and_waits_otherwise():
    lease = LeaseState(ttl=5)
    waiting = asyncio.create_task(lease.next_lease(None))
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing registered yet
    lease.registered_under(11)
    assert await asyncio.wait_for(waiting, 1) == 11
    assert lease.registered.is_set()
    assert await asyncio.wait_for(lease.next_lease(None), 1) == 11  # a waiter that started late
    again = asyncio.create_task(lease.next_lease(11))
    lease.lost()  # lost, then replaced: the waiter sees the new lease, not the gap
    await asyncio.sleep(0)
    assert not again.done()
    lease.registered_under(12)
    assert await asyncio.wait_for(again, 1) == 12


def test_only_a_different_ttl_wakes_registration():
    lease = LeaseState(ttl=5)
    lease.ask_ttl(5)
    assert not lease.ttl_asked.is_set()
    lease.ask_ttl(7)
    assert lease.ttl_asked.is_set() and lease.ttl == 7
