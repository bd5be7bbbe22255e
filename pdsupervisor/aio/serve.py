"""Serving an aiohttp app the way the proxy and the sim engine both need it.

`run_app` is aiohttp's `web.run_app`: the app's `cleanup_ctx` contexts are entered before
the port opens and left after it closed; SIGTERM or SIGINT (the agent stops them with a
signal) ends it. Both cancel a handler when its client goes away (so the upstream work
stops too), and run on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from aiohttp import web

from pdsupervisor.aio.wait import cancel_and_wait

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})
# A background task gets this long to end once cancelled: shutdown must not hang on one.
STOP_TIMEOUT_S = 5.0
# In-flight requests get this long to finish after the port closed (AppRunner's default).
SHUTDOWN_TIMEOUT_S = 60.0
# Idle client connections are kept this long: aiohttp's server default (run_app would lower it to 75 s).
KEEPALIVE_S = 3630.0


def is_wildcard(host: str) -> bool:
    """A bind address meaning every interface: others reach such a server through the node's IP.
    (Here, not in models: the sim engine needs it without loading pydantic.)"""
    return host in WILDCARD_HOSTS


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_app(app: web.Application, host: str, port: int, *, on_listening: Callable[[], None],
            reuse_port: bool = False) -> None:
    """Serve `app` until SIGTERM/SIGINT; `on_listening()` once the port is open. `reuse_port`:
    SO_REUSEPORT, for several processes serving one port (the proxy's workers)."""
    web.run_app(
        app, host=host, port=port, loop=new_event_loop(), print=lambda _banner: on_listening(),
        access_log=None, handler_cancellation=True, backlog=4096, reuse_address=True, reuse_port=reuse_port or None,
        keepalive_timeout=KEEPALIVE_S, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen with `app` as `run_app` does, in a running loop (tests); the caller runs `runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_S,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    return runner


async def stop_tasks(tasks: Iterable[asyncio.Task[None]], what: str, log: logging.Logger) -> None:
    """Cancel background tasks and wait for them, at most STOP_TIMEOUT_S; a straggler is logged and left."""
    if await cancel_and_wait(list(tasks), STOP_TIMEOUT_S):
        log.warning("%s did not stop within %gs; going on", what, STOP_TIMEOUT_S)
