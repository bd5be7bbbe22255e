"""Emptying an engine before a planned stop: out of the proxy's rotation, then until the
requests it has in flight are done.

The proxy routes only to `ready` processes: the drain first says `stopping` and waits until
that status is published. Then it polls the engine's Prometheus text (`DrainSpec.path`) for
the gauges of the requests it runs and queues (`DrainSpec.inflight_metrics`, vLLM's by
default); their samples, over every label set, sum to what a stop now would cut.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pdsupervisor.core.exits import spoken_duration
from pdsupervisor.core.models import DrainSpec

POLL_S = 0.2  # between two reads of the gauges
# Zeros count only when read this long after the `stopping` status was published: a request
# the proxy picked just before it saw the status may still arrive.
SETTLE_S = 1.0
# The gauges cannot be read: this long for the proxy to see the status, and no more.
GRACE_S = 1.0
READ_TIMEOUT_S = 2.0

Count = int | str  # requests in flight, or why they are not known


def inflight(text: str, names: Sequence[str]) -> int | None:
    """The sum of the samples of the gauges `names` in Prometheus `text`; None when it has
    none of them. Raises ValueError when `text` is not Prometheus text (or a value is NaN)."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                total, found = total + sample.value, True
    if not found:
        return None
    if math.isnan(total):
        raise ValueError("a gauge's value is NaN")
    return max(0, round(total))


async def read_inflight(session: aiohttp.ClientSession, url: str, names: Sequence[str]) -> Count:
    """The requests in flight, or why they cannot be known."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return f"GET {url} answered {resp.status}"
            text = await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"GET {url} failed: {str(exc) or type(exc).__name__}"
    try:
        n = inflight(text, names)
    except ValueError as exc:
        return f"{url} is not Prometheus text ({exc})"
    return n if n is not None else f"{url} has none of {', '.join(names)}"


def count(n: Count) -> str:
    return f"{n} requests in flight" if isinstance(n, int) else f"requests in flight unknown ({n})"


def message(n: Count) -> str:
    """The status message while draining."""
    return f"draining: {count(n)}"


async def empty(d: DrainSpec, url: str | None, *, say: Callable[[Count], None],
                published: Callable[[], Awaitable[None]], serving: Callable[[], bool], log: Any) -> str | None:
    """Drain one engine whose gauges are at `url` (None: it has no port); how it was cut
    short by `d.timeout_s` (logged too), None when it was not.

    `say(n)` puts it out of rotation (status `stopping`, saying `n`), `published()` returns
    once that status is where the proxy reads it, `serving()` turns False when the engine
    exited. Drained: zero on two reads in a row, taken `SETTLE_S` after the status was
    published. Gauges that cannot be read at first leave only `GRACE_S` for the proxy to see
    the status; a read that fails later is no zero, the last count stands.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    n: Count = "no port" if url is None else "not read yet"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S)) as session, \
                asyncio.timeout_at(began + d.timeout_s):
            if url is not None:
                n = await read_inflight(session, url, d.inflight_metrics)
            say(n)
            await published()
            if url is None or isinstance(n, str):
                await asyncio.sleep(GRACE_S)
                log.warning("in-flight requests cannot be read: waited only for the proxy to see the drain",
                            why=n, grace_s=GRACE_S)
                return None
            settled, zeros, failing = loop.time() + SETTLE_S, 0, False
            while serving():
                await asyncio.sleep(POLL_S)
                at = loop.time()
                read = await read_inflight(session, url, d.inflight_metrics)
                if isinstance(read, str):
                    if not failing:  # the first failure in a row
                        log.warning("in-flight requests not read; the last count stands", why=read, inflight=n)
                    zeros, failing = 0, True
                    continue
                failing = False
                if read != n:
                    n = read
                    say(n)
                zeros = zeros + 1 if n == 0 and at >= settled else 0
                if zeros >= 2:
                    log.info("drained", took_s=round(loop.time() - began, 1))
                    return None
            log.warning("exited while draining")
            return None
    except TimeoutError:
        log.warning("drain cut short", timeout_s=d.timeout_s, inflight=n)
        return f"drain cut short after {spoken_duration(d.timeout_s)} with {count(n)}"
