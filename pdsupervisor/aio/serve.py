"""Serving an aiohttp app the way the proxy and the sim engine both need it.

Both run until SIGTERM or SIGINT (the agent stops them with a signal), cancel their
handlers when a client goes away (so the upstream work stops too), and use uvloop when
it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


def is_wildcard(host: str) -> bool:
    """A bind address meaning every interface: others reach such a server through the node's IP.
    (Here, not in models: the sim engine needs it without loading pydantic.)"""
    return host in WILDCARD_HOSTS


def run_until_signalled(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main()` in a fresh loop (uvloop if installed); SIGTERM/SIGINT cancel it."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await main()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(guarded())


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen with `app`; the caller runs `runner.cleanup()` when done."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    return runner
