"""The proxy's application: its routes, and its resources as aiohttp cleanup contexts.

Each resource lives as long as the app does, one `cleanup_ctx` each, entered before the
port opens and left, in reverse order, after it closed: the connection pool to the engines
(`UPSTREAM`, `upstream.Upstreams`), the prober (on aiohttp's client), and the benchmark-mode
duplicate requests (`DUPLICATES`). The completion routes, prefill then decode with retry and
ejection, are `exchange.Flow`.

Liveness is the proxy's own, whatever etcd says: every `probe_interval_s` each instance, in
rotation or ejected, gets a `GET /health` (all at once, each bounded by `probe_timeout_s`, on
connections of their own so a probe never waits behind requests). A refused connection or an
answer other than 200 ejects at once: nothing listens, or the engine says it is unwell. No
answer (a timeout, a connection dropped) may be an engine that is only busy: PROBE_MISSES in a
row eject it. An ejected instance answering 200 is back in rotation.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdsupervisor.aio.serve import stop_tasks
from pdsupervisor.proxy.config import ProxyConfig
from pdsupervisor.proxy.errors import JSON_HEADERS, error_response
from pdsupervisor.proxy.exchange import DUPLICATES, UPSTREAM, UPSTREAM_FAILURES, Flow
from pdsupervisor.proxy.instances import Instance, Registry
from pdsupervisor.proxy.limits import no_route
from pdsupervisor.proxy.metrics import ProxyMetrics
from pdsupervisor.proxy.upstream import Conn, Upstreams

__all__ = ["DUPLICATES", "PROXY", "UPSTREAM", "PDProxy", "ProxyConfig"]

log = logging.getLogger("pdsupervisor.proxy")

PROBE_MISSES = 2  # probes in a row without an answer that eject an instance


class PDProxy:
    def __init__(self, cfg: ProxyConfig, registry: Registry, source: str = "static") -> None:
        self.cfg = cfg
        self.registry = registry
        self.metrics = ProxyMetrics(registry)
        self.source = source  # where membership comes from, for /status
        self.flow = Flow(cfg, registry, self.metrics)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app[PROXY] = self
        app.router.add_post("/v1/completions", self.flow.completions)
        app.router.add_post("/v1/chat/completions", self.flow.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_route("*", r"/{path:[\s\S]*}", no_route)  # last: what matches no route above, newlines too
        app.cleanup_ctx.extend((upstream_session, prober, duplicates))
        return app

    # ---- health probing ----------------------------------------------------------------

    async def probe_loop(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)
        while True:
            await asyncio.sleep(self.cfg.probe_interval_s)
            instances = self.registry.instances()
            if instances:
                await asyncio.gather(*(self._probe(session, i, timeout) for i in instances), return_exceptions=True)

    async def _probe(self, session: aiohttp.ClientSession, inst: Instance, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with session.get(inst.base_url + "/health", timeout=timeout) as resp:
                status = resp.status
        except aiohttp.ClientConnectorError as exc:  # refused, no route: nothing serves there
            self._probe_failed(inst, "probe_unreachable", f"probe: {exc}")
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:  # no answer: perhaps only busy
            inst.probe_misses += 1
            if inst.probe_misses >= PROBE_MISSES:
                self._probe_failed(inst, "probe_no_answer", f"probe: no answer {inst.probe_misses} times in a row ({exc!r})")
            return
        if status != 200:
            self._probe_failed(inst, "probe_status", f"probe: /health answered {status}")
            return
        inst.probe_misses = 0
        if inst.ejected and self.registry.holds(inst):
            self.registry.restore(inst)
            log.info("instance %s (%s) is healthy again, back in rotation", inst.endpoint, inst.role)

    def _probe_failed(self, inst: Instance, kind: str, reason: str) -> None:
        if self.registry.holds(inst):  # not one the membership dropped while it was probed
            self.flow.eject(inst, kind, reason)

    # ---- plain routes ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        p, d = len(self.registry.healthy("prefill")), len(self.registry.healthy("decode"))
        status = 200 if p and d else 503
        return web.json_response({"status": "ok" if status == 200 else "unavailable", "prefill": p, "decode": d}, status=status)

    async def status(self, request: web.Request) -> web.Response:
        insts = self.registry.instances()
        return web.json_response({
            "source": self.source,
            "pid": os.getpid(),  # which worker answered, with --workers
            "instances": [i.view() for i in insts],
            "inflight": sum(i.inflight for i in insts if i.role == "decode"),
            "ejected": [i.endpoint for i in insts if i.ejected],
            "generator_on_p": self.cfg.generator_on_p,
            "benchmark_mode": self.cfg.benchmark_mode,
            "repeat_d_times": self.cfg.repeat_d_times,
        })

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self.flow.denied(request)) is not None:
            return denied
        upstreams = request.app[UPSTREAM]
        for inst in self.registry.healthy("decode") + self.registry.healthy("prefill"):
            up: Conn | None = None
            try:
                up = await upstreams.send(inst.endpoint, "GET", "/v1/models")
                body = await up.read()
                if up.status == 200:
                    return web.Response(body=body, headers=JSON_HEADERS)
            except UPSTREAM_FAILURES as exc:
                self.flow.exchange_failed(inst, "models", f"/v1/models: {exc!r}")
            finally:
                if up is not None:
                    upstreams.release(up)
        return error_response(503, "no engine instance is available", "ServiceUnavailable")


PROXY = web.AppKey("proxy", PDProxy)


# ---- the app's resources (cleanup contexts) ---------------------------------------------------


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The connection pool to the engines."""
    cfg = app[PROXY].cfg
    upstreams = Upstreams(connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.read_timeout_s,
                          total_timeout=cfg.total_timeout_s, limit=cfg.pool_size)
    app[UPSTREAM] = upstreams
    try:
        yield
    finally:
        await upstreams.close()


async def prober(app: web.Application) -> AsyncIterator[None]:
    """Probes every instance's `/health` (see the module's docstring), on connections closed
    after each probe: a probe always connects, so a dead engine is a refused connection."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        task = asyncio.create_task(app[PROXY].probe_loop(session))
        yield
        await stop_tasks([task], "the prober", log)


async def duplicates(app: web.Application) -> AsyncIterator[None]:
    """The benchmark-mode duplicate decode requests still running are dropped at shutdown."""
    tasks: set[asyncio.Task[None]] = set()
    app[DUPLICATES] = tasks
    yield
    await stop_tasks(tasks, "the benchmark duplicates", log)
