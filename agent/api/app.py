"""The agent's local REST API (aiohttp).

`build_app(agent, extra_routes)` builds the app; the agent passes the cluster routes
(`agent.routes`) as `extra_routes`, so one server per node serves both. Read endpoints are
open; mutating methods (POST, PUT, PATCH, DELETE) need `Authorization: Bearer <token>`
when a token file is configured, checked by `token_middleware` for the whole app;
`require_token` guards a single handler. Bad input: `agent.api.errors` (JSON 4xx bodies
naming the field, a body size limit, control characters refused).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from agent.api.errors import MAX_BODY, json_error, json_errors, query_int, refuse_control_characters
from agent.config import RestConfig
from agent.process import logs

if TYPE_CHECKING:
    from agent.daemon import Agent

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")
TOKEN_KEY: web.AppKey[str | None] = web.AppKey("token", object)  # type: ignore[arg-type]
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_TAIL = 100_000  # lines

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_ok(request: web.Request) -> bool:
    """True when no token is configured or the request carries it (constant-time compare)."""
    expected = request.app.get(TOKEN_KEY)
    if not expected:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), expected.encode())


def require_token(handler: Handler) -> Handler:
    """Decorator: answer 401 unless the request carries the configured bearer token."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not token_ok(request):
            raise json_error(web.HTTPUnauthorized, "missing or wrong bearer token")
        return await handler(request)

    return wrapped


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in MUTATING and not token_ok(request):
        raise json_error(web.HTTPUnauthorized, "missing or wrong bearer token")
    return await handler(request)


def ssl_context(rc: RestConfig) -> ssl.SSLContext | None:
    if not rc.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(rc.tls_cert, rc.tls_key)
    if rc.tls_client_ca:
        ctx.load_verify_locations(rc.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


async def healthz(request: web.Request) -> web.Response:
    a = _agent(request)
    return web.json_response({
        "ok": True, "name": a.name, "registered": a.lease.lease_id is not None,
        "etcd_reachable": a.registration.healthy,
    })


async def status(request: web.Request) -> web.Response:
    a = _agent(request)
    procs = [m.status().model_dump(mode="json") for m in a.reconciler.snapshot_procs()]
    body = {
        "node": a.facts().model_dump(mode="json"),
        "cluster": a.config.cluster,
        "lease_id": a.lease.lease_id,
        "etcd_reachable": a.registration.healthy,
        "assignment_seen": a.reconciler.assignment_seen,
        "processes": procs,
        "bootstrap": [a.bootstrap.status().model_dump(mode="json")] if a.bootstrap else [],
    }
    return web.json_response(body)


async def process_logs(request: web.Request) -> web.StreamResponse:
    a = _agent(request)
    name = request.match_info["process"]
    n = query_int(request, "tail", 100, 0, MAX_TAIL)
    path = a.log_dir / f"{name}.log"
    if not _NAME.match(name) or not path.is_file():
        raise json_error(web.HTTPNotFound, f"no log for process {name!r}", "process")
    lines = await asyncio.to_thread(logs.tail, path, n)  # a big tail must not stall the loop
    text = "".join(line + "\n" for line in lines)
    if request.query.get("follow") not in ("1", "true", "yes"):
        return web.Response(text=text, content_type="text/plain")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(text.encode())
    try:
        async for chunk in logs.follow(path, a.stopping):
            await resp.write(chunk)
    except ConnectionError:
        pass
    return resp


def build_app(agent: Agent, extra_routes: list[web.RouteDef] | None = None) -> web.Application:
    """The agent's REST app; `extra_routes` (e.g. the coordinator's /cluster routes) are added."""
    # outermost first: errors as JSON, then control characters refused, then the token
    app = web.Application(middlewares=[json_errors, refuse_control_characters, token_middleware],
                          client_max_size=MAX_BODY)
    app[AGENT_KEY] = agent
    app[TOKEN_KEY] = agent.config.rest.token
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/status", status),
        web.get("/logs/{process}", process_logs),
    ])
    if extra_routes:
        app.add_routes(extra_routes)
    return app
