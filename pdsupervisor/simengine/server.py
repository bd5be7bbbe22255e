"""The simulated engine's HTTP server: vLLM's OpenAI routes, timing model and metrics.

Timing model: a request waits for one of `max_batch` slots, then pays
`ttft_per_token * computed tokens` (prefill; skipped by a decode engine that receives valid
`kv_transfer_params`), then `tpot` per output token. The computed tokens are the prompt's
less those its prefix cache holds (prefixcache.py; `--sim-prefix-cache-blocks 0`: all of them).
With every delay zero no timer is armed at all, so the simulator is a cheap baseline for proxy
benchmarks.

As a rank of a DP group (DP size > 1, see dpgroup.py) the engine serves only while its
group is formed: 503 before, and for good once the group broke, which also fails the
requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, TypeGuard

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdsupervisor.aio.serve import is_wildcard, run_app
from pdsupervisor.simengine import shapes
from pdsupervisor.simengine.config import SimConfig
from pdsupervisor.simengine.dpgroup import DPGroup, GroupBroken
from pdsupervisor.simengine.kvstore import KVError, MooncakeKV
from pdsupervisor.simengine.prefixcache import PrefixCache

log = logging.getLogger("pdsupervisor.simengine")


class EngineMetrics:
    """vLLM-named Prometheus metrics, on a registry of this engine's own."""

    def __init__(self, engine: SimEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": engine.cfg.model_id}
        running = Gauge("vllm:num_requests_running", "Requests in a batch slot.", ["model_name"], registry=self.registry)
        running.labels(**labels).set_function(lambda: engine.running)
        waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", ["model_name"], registry=self.registry)
        waiting.labels(**labels).set_function(lambda: engine.waiting)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, ["model_name"], registry=self.registry).labels(**labels)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        # vLLM v1's prefix cache counters, in tokens: those looked up, and those found cached.
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in prompt tokens queried.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in prompt tokens found cached.")
        self.prefill_computed = counter(
            "vllm:sim_prefill_computed_tokens", "Prompt tokens this engine prefilled (not cached, not transferred)."
        )
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.requests = counter("vllm:request_success", "Requests finished.")
        self.received = counter("vllm:sim_requests_received", "Completion requests received, bad ones too.")
        self.local_prefills = counter(
            "vllm:sim_decode_local_prefills", "Decode-role requests without valid kv_transfer_params (prefill paid here)."
        )
        self.kv_transfers = counter(
            "vllm:sim_kv_transfer_hits", "Decode-role requests whose prefill came from a remote engine."
        )
        # --sim-kv-transfer mooncake only (prometheus adds the _total suffix).
        self.mc_put_bytes = counter("vllm:sim_mooncake_kv_put_bytes", "KV bytes a prefill put into Mooncake Store.")
        self.mc_bytes = counter("vllm:sim_mooncake_kv_bytes", "KV bytes a decode read from Mooncake Store and verified.")
        self.mc_verified = counter("vllm:sim_mooncake_kv_verified", "KV hand-offs read and verified (length + sha256).")
        self.mc_failures = counter("vllm:sim_mooncake_kv_failures", "Mooncake puts/gets that failed or did not verify.")


class SimEngine:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(cfg.max_batch)
        self._ids = itertools.count()
        self._id_prefix = f"{os.getpid():x}"
        self.metrics = EngineMetrics(self)
        self.prefix_cache = PrefixCache(cfg.prefix_cache_blocks) if cfg.prefix_cache_blocks > 0 else None
        self.kv: MooncakeKV | None = MooncakeKV(cfg) if cfg.kv_transfer == "mooncake" else None
        self.dp: DPGroup | None = DPGroup(cfg.dp) if cfg.dp is not None else None
        self.endpoint = f"{'127.0.0.1' if is_wildcard(cfg.host) else cfg.host}:{cfg.port}"
        models = {
            "object": "list",
            "data": [{
                "id": cfg.model_id, "object": "model", "created": 0, "owned_by": "vllm",
                "root": cfg.model, "parent": None, "max_model_len": None,
            }],
        }
        self._models_body = json.dumps(models).encode()

    # ---- routes -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app[ENGINE] = self
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/debug/config", self.debug_config)
        app.router.add_get("/debug/kv", self.debug_kv)
        app.router.add_get("/debug/dp", self.debug_dp)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    def _unready(self) -> str | None:
        """Why this engine cannot serve now (its DP group is not formed, or broke); None when it can."""
        return None if self.dp is None or self.dp.ready else self.dp.reason

    async def health(self, request: web.Request) -> web.Response:
        why = self._unready()
        return web.Response() if why is None else web.Response(status=503, text=why)

    async def models(self, request: web.Request) -> web.Response:
        if (why := self._unready()) is not None:
            return _error(why, 503)
        return web.Response(body=self._models_body, content_type="application/json")

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def debug_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.cfg.debug_view())

    async def debug_kv(self, request: web.Request) -> web.Response:
        return web.json_response(self.kv.debug_view() if self.kv else {"mode": self.cfg.kv_transfer})

    async def debug_dp(self, request: web.Request) -> web.Response:
        return web.json_response(self.dp.view() if self.dp else None)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    # ---- generation ----------------------------------------------------------------

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self.metrics.received.inc()
        if (why := self._unready()) is not None:
            return _error(why, 503)
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return _error(f"invalid JSON: {exc}")
        if not isinstance(body, dict):
            return _error("request body must be a JSON object")
        tokens = shapes.prompt_tokens(body, chat)
        prompt_tokens = max(1, len(tokens))
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = 16 if not chat else self.cfg.natural_len
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error("max_tokens must be a positive integer")
        n_out = max_tokens if body.get("ignore_eos") else min(max_tokens, self.cfg.natural_len)
        finish = "length" if n_out == max_tokens else "stop"
        req_id = f"{self._id_prefix}-{next(self._ids)}"

        pay_prefill = True
        if self.cfg.is_consumer:
            kv = body.get("kv_transfer_params")
            if _valid_kv(kv, prompt_tokens) and (self.kv is None or kv.get("mooncake_key")):
                if self.kv is not None:
                    failed = await self._kv_get(kv)
                    if failed is not None:
                        return failed
                pay_prefill = False
                self.metrics.kv_transfers.inc()
            else:  # in mooncake mode, params without a key mean no KV arrived: prefill here
                self.metrics.local_prefills.inc()
        kv_out = None
        if self.cfg.is_producer:
            kv_out = {"remote_engine": self.endpoint, "request_id": req_id, "num_prompt_tokens": prompt_tokens}
            if self.kv is not None:
                seed = f"{req_id}\n{json.dumps(body.get('messages') if chat else body.get('prompt'))}"
                size = self.kv.size_for(prompt_tokens)
                try:
                    async with asyncio.timeout(self.cfg.kv_timeout_s):
                        kv_out.update(await asyncio.to_thread(
                            self.kv.put, f"pdsim/{self.endpoint}/{req_id}", seed, size))
                except (KVError, TimeoutError) as exc:
                    message = str(exc) or f"mooncake put timed out ({self.cfg.kv_timeout_s}s)"
                    self.metrics.mc_failures.inc()
                    log.error("%s", message)
                    return _error(message, 500)
                self.metrics.mc_put_bytes.inc(size)

        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            if pay_prefill:
                await self._prefill(tokens, prompt_tokens)
            else:
                await self._pause(0.0)  # a DP rank whose group broke fails here
            self.metrics.prompt_tokens.inc(prompt_tokens)
            if body.get("stream"):
                return await self._stream(request, body, chat, req_id, prompt_tokens, n_out, finish)
            await self._pause(self.cfg.tpot_s * (n_out - 1))
            text = "".join(shapes.token_text(i) for i in range(n_out))
            self.metrics.generation_tokens.inc(n_out)
            self.metrics.requests.inc()
            return web.Response(
                body=shapes.full_response(
                    chat=chat, req_id=req_id, model=self.cfg.model_id, text=text, finish=finish,
                    prompt_tokens=prompt_tokens, completion_tokens=n_out, kv_transfer_params=kv_out,
                ),
                content_type="application/json",
            )
        except GroupBroken as exc:
            return _error(str(exc), 500)
        finally:
            self.running -= 1
            self._slots.release()

    async def _stream(
        self, request: web.Request, body: dict[str, Any], chat: bool, req_id: str,
        prompt_tokens: int, n_out: int, finish: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        maker = shapes.ChunkMaker(chat=chat, req_id=req_id, model=self.cfg.model_id)
        opts = body.get("stream_options") or {}
        lines: list[bytes] = [maker.role()] if chat else []
        tpot = self.cfg.tpot_s
        try:
            for i in range(n_out):
                if tpot > 0 and i > 0:
                    await resp.write(b"".join(lines))
                    lines.clear()
                    await self._pause(tpot)
                lines.append(maker.token(shapes.token_text(i), finish if i == n_out - 1 else None))
                self.metrics.generation_tokens.inc()
        except GroupBroken as exc:
            await _cut(request, resp, str(exc))
            return resp
        if isinstance(opts, dict) and opts.get("include_usage"):
            lines.append(maker.usage(prompt_tokens, n_out))
        lines.append(shapes.DONE)
        await resp.write(b"".join(lines))
        await resp.write_eof()
        self.metrics.requests.inc()
        return resp

    async def _prefill(self, tokens: list[str] | list[int], prompt_tokens: int) -> None:
        """Prefill what the prefix cache does not hold, then cache the prompt's blocks."""
        cache = self.prefix_cache
        computed = prompt_tokens
        if cache is not None:
            cached = cache.cached_tokens(tokens)
            computed -= cached
            self.metrics.prefix_queries.inc(prompt_tokens)
            self.metrics.prefix_hits.inc(cached)
        await self._pause(self.cfg.ttft_per_token_s * computed)
        self.metrics.prefill_computed.inc(computed)
        if cache is not None:
            cache.store(tokens)

    async def _pause(self, seconds: float) -> None:
        """`seconds` of model time (none armed for 0); in a DP group, GroupBroken once it is broken."""
        if self.dp is not None:
            await self.dp.step(seconds)
        elif seconds > 0:
            await asyncio.sleep(seconds)

    async def _kv_get(self, kv: dict[str, Any]) -> web.Response | None:
        """Read and verify the prefill's KV; an OpenAI-shaped 500 when it fails (never a fallback)."""
        assert self.kv is not None
        try:
            async with asyncio.timeout(self.cfg.kv_timeout_s):
                got = await asyncio.to_thread(
                    self.kv.get_verified, str(kv["mooncake_key"]), kv.get("kv_bytes"), kv.get("kv_sha256"))
        except TimeoutError:
            self.metrics.mc_failures.inc()
            return _error(f"KV transfer failed: mooncake get timed out ({self.cfg.kv_timeout_s}s)", 500)
        except KVError as exc:
            self.metrics.mc_failures.inc()
            log.error("%s", exc)
            return _error(f"KV transfer failed: {exc}", 500)
        self.metrics.mc_bytes.inc(got["bytes_read"])
        self.metrics.mc_verified.inc()
        return None


ENGINE = web.AppKey("engine", SimEngine)


def _valid_kv(kv: Any, prompt_tokens: int) -> TypeGuard[dict[str, Any]]:
    """Valid = produced by a prefill engine for a prompt of the same length."""
    return (
        isinstance(kv, dict)
        and bool(kv.get("remote_engine"))
        and kv.get("request_id") is not None
        and kv.get("num_prompt_tokens") == prompt_tokens
    )


async def _cut(request: web.Request, resp: web.StreamResponse, message: str) -> None:
    """End a stream whose engine died under it: an error event saying why (as vLLM sends), then
    the connection closes with no [DONE], so whoever reads to the end sees a failed answer."""
    with contextlib.suppress(ConnectionError):
        await resp.write(b"data: " + shapes.error_body(message, type_="InternalServerError", code=500) + b"\n\n")
    if request.transport is not None:
        request.transport.close()


def _error(message: str, status: int = 400) -> web.Response:
    type_ = "BadRequestError" if status < 500 else "InternalServerError"
    return web.Response(status=status, body=shapes.error_body(message, type_=type_, code=status),
                        content_type="application/json")


def serve(cfg: SimConfig) -> None:
    """Load (sleep), then listen: like vLLM, the port stays closed until the model is loaded.
    Runs until SIGTERM/SIGINT."""
    engine = SimEngine(cfg)
    app = engine.app()
    app.cleanup_ctx.extend([_dp_group, _load])
    run_app(app, cfg.host, cfg.port, on_listening=lambda: log.info(
        "sim engine %s (kv_role=%s) listening on %s:%d", cfg.model_id, cfg.kv_role, cfg.host, cfg.port))
    if engine.kv is not None:
        # Not `close()`: it can crash the process (SIGSEGV seen after a frozen master) and
        # holds the GIL for ~25 s when the master or etcd is gone. The master drops this
        # client's segment after its client TTL, and puts prefer the prefill's own segment.
        # The store's destructor would close() at interpreter exit: leave without it.
        log.info("leaving the mooncake segment to the master's client TTL")
        logging.shutdown()
        os._exit(0)


async def _load(app: web.Application) -> AsyncIterator[None]:
    """The model "load", a cleanup context: run_app opens the port once it is done."""
    engine = app[ENGINE]
    cfg = engine.cfg
    if cfg.ignored:
        log.warning("ignoring vLLM flags the simulator does not use: %s", " ".join(cfg.ignored))
    if cfg.load_time_s > 0:
        log.info("simulating model load for %.2fs", cfg.load_time_s)
        await asyncio.sleep(cfg.load_time_s)
    if engine.kv is not None:  # part of the "load": the port opens only once the store is up
        await asyncio.to_thread(engine.kv.setup)
    yield


async def _dp_group(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: join the DP group (rank 0: listen for it) before the model "loads",
    as vLLM sets up its DP group first; leave it on the way out."""
    group = app[ENGINE].dp
    if group is not None:
        await group.start()
    yield
    if group is not None:
        await group.stop()
