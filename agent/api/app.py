"""The agent's local REST API (aiohttp).

`build_app(agent, extra_routes)` builds the app; the agent passes the cluster routes
(`agent.routes`) as `extra_routes`, so one server per node serves both. Who may call what:
`agent.api.auth` (open reads; a token or client certificate for writes and process logs;
loopback only without credentials). Bad input: `agent.api.errors` (JSON 4xx bodies naming
the field, a body size limit, control characters refused).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from aiohttp import web

from agent.api.auth import POLICY, AccessPolicy, guard, require_credential, ssl_context
from agent.api.errors import MAX_BODY, json_error, json_errors, query_int, refuse_control_characters
from agent.metrics import CONTENT_TYPE
from agent.process import logs

if TYPE_CHECKING:
    from agent.daemon import Agent

__all__ = ["build_app", "require_credential", "ssl_context"]

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_TAIL = 100_000  # lines


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


def _health(a: Agent) -> dict[str, object]:
    """`ok`: the agent runs and answers (liveness); `ready`: it is a member of the cluster now,
    registered under a lease confirmed alive within its TTL (readiness)."""
    registered, reachable = a.lease.lease_id is not None, a.registration.healthy
    return {"ok": True, "name": a.name, "registered": registered, "etcd_reachable": reachable,
            "ready": registered and reachable}


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the agent answers, registered or not (see `readyz`)."""
    return web.json_response(_health(_agent(request)))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when `ready`, else 503 with the same body (a probe or load balancer)."""
    body = _health(_agent(request))
    return web.json_response(body, status=200 if body["ready"] else 503)


async def status(request: web.Request) -> web.Response:
    a = _agent(request)
    procs = [m.status().model_dump(mode="json") for m in a.reconciler.snapshot_procs()]
    body = {
        # what registration last published (re-probed every FACTS_RECHECK_S); the host is
        # probed here only before the first registration
        "node": (a.registration.published or a.facts()).model_dump(mode="json"),
        "cluster": a.config.cluster,
        "lease_id": a.lease.lease_id,
        "etcd_reachable": a.registration.healthy,
        "assignment_seen": a.reconciler.assignment_seen,
        "processes": procs,
        "bootstrap": [a.bootstrap.status().model_dump(mode="json")] if a.bootstrap else [],
    }
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text (`agent.metrics`)."""
    return web.Response(body=_agent(request).metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


@require_credential
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
    # outermost first: errors as JSON, then control characters refused, then credentials
    app = web.Application(middlewares=[json_errors, refuse_control_characters, guard], client_max_size=MAX_BODY)
    app[AGENT_KEY] = agent
    app[POLICY] = AccessPolicy.from_config(agent.config)
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/status", status),
        web.get("/metrics", metrics),
        web.get("/logs/{process}", process_logs),
    ])
    if extra_routes:
        app.add_routes(extra_routes)
    return app
