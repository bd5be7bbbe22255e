"""The event wait behind every long-lived loop keeps a cancellation (CPython gh-86296)."""

from __future__ import annotations

import asyncio

import pytest

from pdsupervisor.aio.wait import cancel_and_wait, wait_event


async def _loop_on(event: asyncio.Event) -> None:
    while True:  # the shape of the status writer, the coordinator and the proxy's refresher
        await wait_event(event, 10)
        event.clear()


# 0-2 loop turns between set() and cancel(): the cancellation arrives while asyncio.wait_for is still
# finishing its wait, the cases the old asyncio.wait_for(event.wait(), t) swallowed (the loop ran on).
# 3 turns: the wait has returned before the cancel; it passed with the old code too. A control that the
# test itself ends a loop that was cancelled normally, not a case of the bug.
@pytest.mark.parametrize("turns_between", [
    pytest.param(0, id="same-turn-0"),
    pytest.param(1, id="same-turn-1"),
    pytest.param(2, id="same-turn-2"),
    pytest.param(3, id="control-wait-already-returned"),
])
def test_cancel_in_the_same_turn_as_the_event_ends_the_loop(turns_between: int) -> None:
    async def main() -> bool:
        event = asyncio.Event()
        task = asyncio.create_task(_loop_on(event))
        for _ in range(3):
            await asyncio.sleep(0)  # the loop is now waiting on the event
        event.set()
        for _ in range(turns_between):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        if not done:
            task.cancel()
            await asyncio.wait([task], timeout=2)
        return bool(done) and task.cancelled()

    assert asyncio.run(main())


def test_wait_event_reports_set_and_timeout() -> None:
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_later(0.01, event.set)
        return timed_out, await wait_event(event, 5)

    assert asyncio.run(main()) == (False, True)


def test_cancel_and_wait_returns_a_task_that_ignores_cancellation() -> None:
    async def stubborn(release: asyncio.Event) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await release.wait()  # swallows the cancellation until released

    async def main() -> tuple[list[str], list[str]]:
        release = asyncio.Event()
        polite = asyncio.create_task(asyncio.sleep(60), name="polite")
        rude = asyncio.create_task(stubborn(release), name="rude")
        await asyncio.sleep(0)
        stuck = [t.get_name() for t in await cancel_and_wait([polite, rude], 0.2)]
        release.set()
        await rude
        return stuck, [t.get_name() for t in (polite, rude) if t.cancelled()]

    assert asyncio.run(main()) == (["rude"], ["polite"])
