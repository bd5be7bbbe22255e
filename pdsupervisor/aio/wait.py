"""Waiting on an asyncio.Event with a timeout, without losing a cancellation.

Every long-lived loop here (status writer, coordinator, proxy routing refresh) sleeps on
"something changed, or `timeout` passed". `asyncio.wait_for(event.wait(), t)` looks right
but, on Python 3.11, returns normally when the event is set in the same loop turn as the
task is cancelled (CPython gh-86296, fixed in 3.12): the cancellation is gone and the loop
runs on, so a shutdown that awaits it hangs forever. `asyncio.timeout` keeps it.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True when `event` is set within `timeout` seconds, False when the time ran out."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], timeout: float) -> list[asyncio.Task[Any]]:
    """Cancel `tasks` and wait up to `timeout` seconds for them to end; the ones still running.

    A shutdown must not hang on a task that ignored its cancellation: the caller logs the
    stragglers (with their stacks) and goes on.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    return list(pending)
