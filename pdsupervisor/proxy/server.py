"""The proxy's application: its routes, its upstream session and the prober of ejected instances.

The completion routes, prefill then decode with retry and ejection, are `exchange.Flow`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdsupervisor.proxy.config import ProxyConfig
from pdsupervisor.proxy.exchange import JSON_HEADERS, Flow, error_response
from pdsupervisor.proxy.instances import Instance, Registry
from pdsupervisor.proxy.metrics import ProxyMetrics

__all__ = ["PDProxy", "ProxyConfig"]

log = logging.getLogger("pdsupervisor.proxy")


class PDProxy:
    def __init__(self, cfg: ProxyConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.metrics = ProxyMetrics(registry)
        self.source = "static"
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.flow = Flow(cfg, registry, self.metrics, self._spawn)

    # ---- lifecycle -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics_route)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.pool_size, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(
            total=self.cfg.total_timeout_s, connect=self.cfg.connect_timeout_s, sock_read=self.cfg.read_timeout_s
        )
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        self._spawn(self._probe_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session:
            await self._session.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    # ---- health probing ----------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.probe_interval_s)
            ejected = self.registry.ejected()
            if ejected:
                await asyncio.gather(*(self._probe(i) for i in ejected), return_exceptions=True)

    async def _probe(self, inst: Instance) -> None:
        timeout = aiohttp.ClientTimeout(total=max(0.2, min(2.0, self.cfg.probe_interval_s)))
        try:
            async with self.session.get(inst.base_url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        if ok and inst.ejected:
            self.registry.restore(inst)
            log.info("instance %s (%s) is healthy again, back in rotation", inst.endpoint, inst.role)

    # ---- plain routes ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        p, d = len(self.registry.healthy("prefill")), len(self.registry.healthy("decode"))
        status = 200 if p and d else 503
        return web.json_response({"status": "ok" if status == 200 else "unavailable", "prefill": p, "decode": d}, status=status)

    async def status(self, request: web.Request) -> web.Response:
        insts = self.registry.instances()
        return web.json_response({
            "source": self.source,
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
        for inst in self.registry.healthy("decode") + self.registry.healthy("prefill"):
            try:
                async with self.session.get(inst.base_url + "/v1/models") as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        return web.Response(body=body, headers=JSON_HEADERS)
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.flow.eject(inst, f"/v1/models: {exc!r}")
        return error_response(503, "no engine instance is available", "ServiceUnavailable")

    # ---- the PD flow ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.flow.handle(request, self.session, "/v1/completions", chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.flow.handle(request, self.session, "/v1/chat/completions", chat=True)
