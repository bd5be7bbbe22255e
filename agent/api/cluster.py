"""Cluster REST routes served by every agent. Thin: writes are desired state, reads come from etcd.

`cluster_routes(store)` gives the route list the agent mounts beside its own; the app's
`agent.api.auth.guard` checks every mutating request (credential, Origin, body type) first.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.api.auth import audit
from agent.api.errors import query_int
from pdsupervisor.api.openapi import openapi_document, openapi_yaml
from pdsupervisor.core.cluster_view import change_impact, cluster_document
from pdsupervisor.core.documents import ErrorBody, Event, EventsDocument, FieldProblem, SubmitAnswer, nodes_document
from pdsupervisor.core.etcd_members import ReplaceRequest
from pdsupervisor.core.spec import SpecError, load_spec
from pdsupervisor.store.cluster import SubmitResult, observe, observe_nodes, request_stop, submit_spec
from pdsupervisor.store.etcd import Store, StoreUnavailable
from pdsupervisor.store.etcd_health import ReplaceRefused, etcd_health, replace_member

Handler = Callable[[web.Request, Store], Awaitable[web.StreamResponse]]
__all__ = ["cluster_routes", "openapi_document"]
MAX_EVENTS = 1000  # per GET /events


def document(doc: BaseModel, status: int = 200) -> web.Response:
    """A document model as JSON (`pdsupervisor.core.documents`: what the OpenAPI schemas describe)."""
    return web.json_response(doc.model_dump(mode="json"), status=status)


def error(status: int, message: str, problems: list[FieldProblem] | None = None) -> web.Response:
    return web.json_response(ErrorBody(error=message, problems=problems).served(), status=status)


def invalid_spec(problems: list[tuple[str, str]]) -> web.Response:
    return error(400, "invalid spec", [FieldProblem(field=p, message=w) for p, w in problems])


def _bind(store: Store, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Give `handler` the store; etcd away becomes a 503 that says so."""

    @functools.wraps(handler)
    async def bound(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request, store)
        except StoreUnavailable as exc:
            return error(503, f"etcd is unavailable: {exc}")

    return bound


def _submit_response(result: SubmitResult) -> web.Response:
    if result.status < 400:
        return document(SubmitAnswer(generation=result.generation, message=result.message, impact=result.impact),
                        result.status)
    body = ErrorBody(error=result.message, generation=result.generation, message=result.message)
    return web.json_response(body.served(), status=result.status)


async def start_cluster(request: web.Request, store: Store) -> web.Response:
    try:
        spec = load_spec(await request.read())
    except SpecError as exc:
        return invalid_spec(exc.problems)
    if spec.cluster != store.cluster:
        return invalid_spec([("cluster", f"{spec.cluster!r} but these agents serve cluster {store.cluster!r}")])
    replace = request.query.get("replace", "").lower() in ("1", "true", "yes")
    result = await submit_spec(store, spec, replace=replace)
    if result.status < 400 and replace and not result.message:
        result = dataclasses.replace(result, impact=change_impact(await observe(store)))
    if result.status < 400:
        did = (f"generation {result.generation} {result.message}: nothing changed" if result.message
               else f"generation {result.generation} submitted" + (" (replace)" if replace else ""))
        await audit(request, store, did, generation=result.generation, model=spec.model)
    return _submit_response(result)


async def stop_cluster(request: web.Request, store: Store) -> web.Response:
    result = await request_stop(store)
    if result.status < 400:
        await audit(request, store, result.message or f"stop of generation {result.generation} requested",
                    generation=result.generation)
    return _submit_response(result)


async def get_cluster(request: web.Request, store: Store) -> web.Response:
    # one snapshot, the leader key in it: the document is the cluster as it was at one revision
    return document(cluster_document(await observe(store), time.time()))


async def get_nodes(request: web.Request, store: Store) -> web.Response:
    return document(nodes_document(*await observe_nodes(store)))


async def get_events(request: web.Request, store: Store) -> web.Response:
    limit = query_int(request, "limit", 100, 1, MAX_EVENTS)
    events = [Event.model_validate(e) for e in await store.events(limit)]
    return document(EventsDocument(events=events))


async def get_etcd(request: web.Request, store: Store) -> web.Response:
    # the member list and each member's own status: answered without a quorum too
    return document(await etcd_health(store))


async def replace_etcd_member(request: web.Request, store: Store) -> web.Response:
    try:
        req = ReplaceRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        return error(400, "invalid request", [FieldProblem(field=".".join(map(str, e["loc"])) or "body",
                                                           message=e["msg"]) for e in exc.errors()])
    try:
        done = await replace_member(store, req)
    except ReplaceRefused as exc:
        return error(409, str(exc))
    await audit(request, store, f"etcd member {req.name} replaced by {done.name} at {done.peer_url}",
                removed=done.removed_id, added=done.added_id)
    return document(done)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=openapi_yaml(), content_type="application/yaml")


def cluster_routes(store: Store) -> list[web.RouteDef]:
    return [
        web.post("/cluster/start", _bind(store, start_cluster)),
        web.post("/cluster/stop", _bind(store, stop_cluster)),
        web.get("/cluster", _bind(store, get_cluster)),
        web.get("/nodes", _bind(store, get_nodes)),
        web.get("/events", _bind(store, get_events)),
        web.get("/etcd", _bind(store, get_etcd)),
        web.post("/etcd/replace-member", _bind(store, replace_etcd_member)),
        web.get("/openapi.yaml", openapi),
    ]
