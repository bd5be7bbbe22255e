"""Cluster REST routes served by every agent. Thin: writes are desired state, reads come from etcd.

Mount with `add_cluster_routes(app, store, token)`. Mutating routes need
`Authorization: Bearer <token>` when a token is configured.
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Any

import yaml
from aiohttp import web

from pdsupervisor.cluster_view import cluster_document, members_by_name
from pdsupervisor.control import SubmitResult, observe, request_stop, submit_spec
from pdsupervisor.spec import SpecError, validate_spec
from pdsupervisor.store import Store, StoreUnavailable

STORE_KEY = web.AppKey("pdsupervisor.store", Store)
TOKEN_KEY = web.AppKey("pdsupervisor.token", str)  # empty string: no token configured

routes = web.RouteTableDef()


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def authorized(request: web.Request) -> bool:
    token = request.app.get(TOKEN_KEY, "")
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@web.middleware
async def guard(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Token check on every mutating request; etcd away becomes a 503 that says so."""
    if request.method not in ("GET", "HEAD", "OPTIONS") and not authorized(request):
        return error(401, "missing or wrong bearer token", hint="send Authorization: Bearer <token>")
    try:
        return await handler(request)
    except StoreUnavailable as exc:
        return error(503, f"etcd is unavailable: {exc}")


def _submit_response(result: SubmitResult) -> web.Response:
    body = {"generation": result.generation, "message": result.message}
    return web.json_response(body if result.status < 400 else {"error": result.message, **body}, status=result.status)


@routes.post("/cluster/start")
async def start_cluster(request: web.Request) -> web.Response:
    raw = await request.text()
    try:
        data = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        return error(400, "body is not YAML or JSON", problems=[{"field": "spec", "message": str(exc)}])
    try:
        spec = validate_spec(data)
    except SpecError as exc:
        return error(400, "invalid spec", problems=[{"field": p, "message": w} for p, w in exc.problems])
    store = request.app[STORE_KEY]
    if spec.cluster != store.cluster:
        return error(400, "invalid spec", problems=[{
            "field": "cluster", "message": f"{spec.cluster!r} but these agents serve cluster {store.cluster!r}"}])
    replace = request.query.get("replace", "").lower() in ("1", "true", "yes")
    return _submit_response(await submit_spec(store, spec, replace=replace))


@routes.post("/cluster/stop")
async def stop_cluster(request: web.Request) -> web.Response:
    return _submit_response(await request_stop(request.app[STORE_KEY]))


@routes.get("/cluster")
async def get_cluster(request: web.Request) -> web.Response:
    return web.json_response(cluster_document(await observe(request.app[STORE_KEY])))


@routes.get("/nodes")
async def get_nodes(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    obs = await observe(store)
    return web.json_response({"leader": obs.leader, "nodes": members_by_name(obs.members)})


@routes.get("/events")
async def get_events(request: web.Request) -> web.Response:
    limit = int(request.query.get("limit", "100"))
    return web.json_response({"events": await request.app[STORE_KEY].events(limit)})


@routes.get("/openapi.yaml")
async def openapi(request: web.Request) -> web.Response:
    text = resources.files("pdsupervisor").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


def add_cluster_routes(app: web.Application, store: Store, token: str = "") -> None:
    app[STORE_KEY] = store
    app[TOKEN_KEY] = token
    app.middlewares.append(guard)
    app.add_routes(routes)


def openapi_document() -> dict[str, Any]:
    return yaml.safe_load(resources.files("pdsupervisor").joinpath("openapi.yaml").read_text())


__all__ = ["add_cluster_routes", "authorized", "guard", "openapi_document"]
