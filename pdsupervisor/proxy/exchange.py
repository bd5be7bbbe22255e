"""The prefill-then-decode flow of one client request.

Flow (as the seed's proxy): the request, with `max_tokens=1` and `stream=false`, goes to a
prefill instance; its `kv_transfer_params` are added to the original request, which goes
to a decode instance whose answer is passed to the client chunk by chunk.

Failure rules: an instance that refuses the connection, drops it or answers 5xx is
ejected at once (the prober, `server`, brings it back when `/health` answers 200), and the step is
retried on another instance as long as no byte has been sent to the client. The client's
disconnect cancels the handler (`handler_cancellation=True`), which closes the upstream
connection, so the engine stops working for nobody.

Each request's steps share one `Exchange`, a slotted dataclass built once the body is parsed,
instead of passing its parts positionally: the proxy's CPU per request is what
bench/proxy_bench.py measures, so this path stays plain (no validation layer, no per-step objects;
the body's few checks, size, JSON object, depth, are `limits`, cheap for nearly every request).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdsupervisor.proxy.config import ProxyConfig
from pdsupervisor.proxy.errors import JSON_HEADERS, ProxyError, error_response
from pdsupervisor.proxy.instances import Instance, ProxyRole, Registry
from pdsupervisor.proxy.limits import parse_body, read_body
from pdsupervisor.proxy.metrics import ProxyMetrics
from pdsupervisor.proxy.upstream import Conn, UpstreamError, Upstreams

log = logging.getLogger("pdsupervisor.proxy")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# Asks a vLLM v1 connector to keep the KV for a remote decode; ignored by v0 engines.
PREFILL_KV_REQUEST = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}


class ClientGone(Exception):
    """The client's connection closed while its stream was written: not the instance's fault
    (not an upstream failure: nothing is ejected)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client gone")
        self.response = response


class Passthrough(Exception):
    """An upstream 4xx: the client's fault, handed back as it is."""

    def __init__(self, response: web.Response) -> None:
        super().__init__("upstream 4xx")
        self.response = response


# What an attempt on one instance can fail with and still be counted and handled by the proxy
# (a TimeoutError waiting for the answer; not connecting, or the exchange broken, `UpstreamError`);
# any other error is a bug, answered 500.
UPSTREAM_FAILURES = (TimeoutError, UpstreamError)

# App state (set by the server's cleanup contexts): the connection pool to the engines, and
# the benchmark-mode duplicate requests under way.
UPSTREAM = web.AppKey("upstream", Upstreams)
DUPLICATES = web.AppKey("duplicates", set[asyncio.Task[None]])


@dataclass(slots=True, eq=False)
class Exchange:
    """One client request on its way through prefill and decode: what its steps share."""

    request: web.Request
    upstreams: Upstreams  # the connection pool to the engines
    path: str  # the route, and the upstream path
    chat: bool  # /v1/chat/completions
    start: float  # perf_counter() at arrival: time to first token, latency
    raw: bytes  # the client's body as it came
    body: dict[str, Any]  # ... parsed (a non-empty JSON object)
    tokens: int  # the scheduling weight (not a tokenizer's count)
    stream: bool  # the client asked for server-sent events
    prefill: dict[str, Any] | None = None  # the prefill's answer
    payload: bytes = b""  # what decode gets: `raw` plus the prefill's kv_transfer_params


class Flow:
    """The completion routes: prefill, then decode, with retry and ejection."""

    def __init__(self, cfg: ProxyConfig, registry: Registry, metrics: ProxyMetrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.metrics = metrics
        self._api_keys = [k.encode() for k in cfg.api_keys]

    def denied(self, request: web.Request) -> web.Response | None:
        """A 401 when API keys are configured and the request carries none of them."""
        if not self._api_keys:
            return None
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        given_b = given.encode()
        if any(hmac.compare_digest(given_b, k) for k in self._api_keys):
            return None
        return error_response(401, "invalid or missing API key", "AuthenticationError")

    def eject(self, inst: Instance, kind: str, reason: str) -> None:
        """Take `inst` out of rotation (logged and counted by `kind` if it was in rotation)."""
        if self.registry.eject(inst, reason):
            log.warning("ejecting %s instance %s: %s", inst.role, inst.endpoint, reason)
            self.metrics.ejections.inc(inst.role, kind)

    def exchange_failed(self, inst: Instance, kind: str, reason: str) -> None:
        """An exchange with `inst` failed: count it and eject the instance until its probe answers again."""
        inst.failures += 1
        self.metrics.errors.inc("upstream_" + inst.role)
        self.eject(inst, kind, reason)

    # ---- routes ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/chat/completions", chat=True)

    async def _handle(self, request: web.Request, path: str, *, chat: bool) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            if (denied := self.denied(request)) is not None:
                status = denied.status
                return denied
            raw = await read_body(request, self.cfg.max_body_bytes)
            body = parse_body(raw)
            ex = Exchange(request=request, upstreams=request.app[UPSTREAM], path=path, chat=chat, start=start, raw=raw, body=body,
                          tokens=len(raw) // 4 + 1, stream=bool(body.get("stream")))
            ex.prefill = prefill = await self._prefill(ex)
            ex.payload = _with_kv(raw, prefill.get("kv_transfer_params"))
            resp = await self._decode_with_fanout(ex)
            status = resp.status
            return resp
        except Passthrough as p:
            status = p.response.status
            return p.response
        except ClientGone as gone:
            status = 499  # client went away mid-stream
            return gone.response
        except ProxyError as e:
            status = e.status
            self.metrics.errors.inc(f"http_{e.status}")
            return error_response(e.status, e.message, e.type_, e.param)
        except asyncio.CancelledError:
            status = 499  # client went away
            raise
        finally:
            m = self.metrics
            m.requests.inc(path, str(status))
            m.latency.observe(time.perf_counter() - start, path)

    # ---- steps ----------------------------------------------------------------------------

    async def _prefill(self, ex: Exchange) -> dict[str, Any]:
        req = dict(ex.body)
        req["max_tokens"] = 1
        if ex.chat and "max_completion_tokens" in req:
            req["max_completion_tokens"] = 1
        req["stream"] = False
        req.pop("stream_options", None)
        req["kv_transfer_params"] = PREFILL_KV_REQUEST
        payload = json.dumps(req, separators=(",", ":")).encode()
        data = await self._call(ex, "prefill", payload, self.registry.prompt_keys(ex.body, ex.chat))
        try:
            out = json.loads(data)
        except ValueError:
            raise ProxyError(502, "prefill answered with invalid JSON", "BadGateway") from None
        return out if isinstance(out, dict) else {}

    async def _call(self, ex: Exchange, role: ProxyRole, payload: bytes, keys: Sequence[int] = ()) -> bytes:
        """One non-streamed upstream request, retried on other instances of the role; its body.
        `keys`: the prompt's, for `--policy prefix` (see Registry.prompt_keys)."""
        tried: set[Instance] = set()
        tokens = ex.tokens
        while True:
            inst = self._pick(role, tried, keys)
            tried.add(inst)
            self.registry.acquire(inst, tokens)
            t0 = time.perf_counter()
            up: Conn | None = None
            try:
                up = await ex.upstreams.send(inst.endpoint, "POST", ex.path, payload)
                data = await self._body(inst, up, t0)
                if data is None:
                    continue
                if up.status >= 400:
                    raise Passthrough(web.Response(status=up.status, body=data, headers=JSON_HEADERS))
                return data
            except UPSTREAM_FAILURES as exc:
                if (give_up := self._attempt_failed(inst, t0, exc)) is not None:
                    raise give_up from None
            finally:
                if up is not None:
                    ex.upstreams.release(up)
                self.registry.release(inst, tokens)

    async def _decode_with_fanout(self, ex: Exchange) -> web.StreamResponse:
        if not (self.cfg.benchmark_mode and self.cfg.repeat_d_times > 0):
            return await self._decode(ex)
        # The duplicates are load, not the answer: once the client has its whole answer they
        # run to their end even if the client hangs up (that cancels this handler); they are
        # dropped only when the client's own answer fails or is abandoned.
        running = ex.request.app[DUPLICATES]
        extras = [asyncio.create_task(self._drain_decode(ex)) for _ in range(self.cfg.repeat_d_times)]
        for t in extras:
            running.add(t)
            t.add_done_callback(running.discard)
        try:
            return await self._decode(ex)
        except BaseException:
            for t in extras:
                t.cancel()
            raise

    async def _drain_decode(self, ex: Exchange) -> None:
        """A benchmark-mode duplicate: same prompt to another decode slot, answer dropped."""
        try:
            await self._call(ex, "decode", ex.payload)
        except (ProxyError, Passthrough):
            self.metrics.errors.inc("benchmark_duplicate")

    async def _decode(self, ex: Exchange) -> web.StreamResponse:
        tried: set[Instance] = set()
        tokens = ex.tokens
        while True:
            inst = self._pick("decode", tried)
            tried.add(inst)
            self.registry.acquire(inst, tokens)
            t0 = time.perf_counter()
            resp: web.StreamResponse | None = None
            up: Conn | None = None
            try:
                up = await ex.upstreams.send(inst.endpoint, "POST", ex.path, ex.payload)
                ctype = up.content_type or "application/json"
                if not (ex.stream and up.status == 200 and ctype.startswith("text/event-stream")):
                    data = await self._body(inst, up, t0)
                    if data is None:
                        continue
                    self.metrics.ttft.observe(time.perf_counter() - ex.start, ex.path)
                    return web.Response(status=up.status, body=data, headers={"Content-Type": ctype})
                relay = _FirstTokenSwap(ex.prefill or {}, ex.chat) if self.cfg.generator_on_p else None
                async for chunk in up.chunks():
                    if relay is not None:
                        chunk = relay.feed(chunk)
                        if not chunk:
                            continue
                    if resp is None:
                        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
                        await _to_client(resp.prepare(ex.request), resp)
                        self.metrics.ttft.observe(time.perf_counter() - ex.start, ex.path)
                    await _to_client(resp.write(chunk), resp)
                if resp is None:
                    raise UpstreamError("decode closed the stream without sending anything")
                self._outcome(inst, "ok", t0)
                await _to_client(resp.write_eof(), resp)
                return resp
            except UPSTREAM_FAILURES as exc:
                give_up = self._attempt_failed(inst, t0, exc)
                if resp is not None:  # bytes already sent: no retry possible, tell the client in-band
                    if give_up is not None:
                        return await _abort_stream(resp, "decode instance timed out")
                    self.metrics.errors.inc("stream_broken")
                    return await _abort_stream(resp, f"decode instance failed mid-stream: {exc!r}")
                if give_up is not None:
                    raise give_up from None
            finally:
                if up is not None:
                    ex.upstreams.release(up)
                self.registry.release(inst, tokens)

    # ---- one attempt's outcome ------------------------------------------------------------

    async def _body(self, inst: Instance, up: Conn, t0: float) -> bytes | None:
        """A whole (non-streamed) answer, counted once: None after a 5xx (the instance is
        ejected: try another); an empty 200 is a broken exchange, raised as one."""
        data = await up.read()
        if up.status >= 500:
            self._failed(inst, t0, "5xx", f"HTTP {up.status}")
            return None
        if up.status == 200 and not data:  # counted once, as a failure, by _attempt_failed
            raise UpstreamError(f"empty 200 from {inst.role}")
        self._outcome(inst, "ok" if up.status < 400 else "4xx", t0)
        return data

    def _attempt_failed(self, inst: Instance, t0: float, exc: BaseException) -> ProxyError | None:
        """Count a failed attempt and eject the instance; the error that ends the request, or
        None to try another instance. A timeout ends it (a hung engine must not take the next
        request too); connecting that timed out is a `ConnectError`, tried elsewhere."""
        if isinstance(exc, TimeoutError):
            self._failed(inst, t0, "timeout", "timed out")
            return ProxyError(504, f"{inst.role} instance {inst.endpoint} timed out", "GatewayTimeout")
        self._failed(inst, t0, "conn_error", repr(exc))
        return None

    def _failed(self, inst: Instance, t0: float, outcome: str, reason: str) -> None:
        self._outcome(inst, outcome, t0)
        self.exchange_failed(inst, outcome, reason)

    def _pick(self, role: ProxyRole, tried: set[Instance], keys: Sequence[int] = ()) -> Instance:
        inst = self.registry.pick(role, tried, keys)
        if inst is not None:
            return inst
        if tried:
            raise ProxyError(502, f"every {role} instance failed for this request", "BadGateway")
        raise ProxyError(503, f"no {role} instance is available", "ServiceUnavailable")

    def _outcome(self, inst: Instance, outcome: str, t0: float) -> None:
        """Count one upstream exchange (exactly once per attempt); "ok" is what `served` counts."""
        if outcome == "ok":
            inst.served += 1
        m = self.metrics
        m.upstream.inc(inst.role, inst.endpoint, outcome)
        m.instance_latency.observe(time.perf_counter() - t0, inst.role, inst.endpoint)


async def _to_client(write: Awaitable[Any], resp: web.StreamResponse) -> None:
    """A write to the streaming client; its connection closing is `ClientGone`."""
    try:
        await write
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
        raise ClientGone(resp) from None


async def _abort_stream(resp: web.StreamResponse, message: str) -> web.StreamResponse:
    """Tell a streaming client in-band (as vLLM does) that the answer is cut short."""
    err = {"error": {"message": message, "type": "BadGateway", "code": 502}}
    try:
        await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return resp


def _with_kv(raw: bytes, kv: Any) -> bytes:
    """The client's body plus the prefill's `kv_transfer_params`, without re-encoding it.

    The body is a non-empty JSON object (checked), so the key can be spliced in before its
    closing brace; a key the client sent is overridden (JSON parsers keep the last one).
    """
    if not kv:
        return raw
    end = raw.rstrip()
    return end[:-1] + b',"kv_transfer_params":' + json.dumps(kv, separators=(",", ":")).encode() + b"}"


class _FirstTokenSwap:
    """`--generator-on-p-node`: the prefill's token goes first, decode's first token is dropped."""

    def __init__(self, prefill: dict[str, Any], chat: bool) -> None:
        self.chat = chat
        self.buf = b""
        self.done = False
        self.first = self._prefill_chunk(prefill)

    def _prefill_chunk(self, prefill: dict[str, Any]) -> bytes:
        choice = (prefill.get("choices") or [{}])[0]
        head = {"id": prefill.get("id", ""), "created": prefill.get("created", 0), "model": prefill.get("model", "")}
        if self.chat:
            text = (choice.get("message") or {}).get("content") or ""
            c = {"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": None}
            payload = dict(head, object="chat.completion.chunk", choices=[c])
        else:
            c = {"index": 0, "text": choice.get("text", ""), "logprobs": None, "finish_reason": None}
            payload = dict(head, object="text_completion", choices=[c])
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return chunk
        self.buf += chunk
        out = [self.first] if self.first else []
        self.first = b""
        while b"\n\n" in self.buf and not self.done:
            event, self.buf = self.buf.split(b"\n\n", 1)
            if self._has_token(event):
                self.done = True  # drop it: the prefill already produced this token
            else:
                out.append(event + b"\n\n")
        if self.done:
            out.append(self.buf)
            self.buf = b""
        return b"".join(out)

    def _has_token(self, event: bytes) -> bool:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return False
        try:
            choices = json.loads(event[6:]).get("choices") or []
        except ValueError:
            return False
        if not choices:
            return False
        c = choices[0]
        return bool((c.get("delta") or {}).get("content") if self.chat else c.get("text"))
