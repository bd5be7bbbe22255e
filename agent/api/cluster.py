"""Cluster REST routes served by every agent. Thin: writes are desired state, reads come from etcd.

`cluster_routes(store, documents)` gives the route list the agent mounts beside its own; the
app's `agent.api.auth.guard` checks every mutating request (credential, Origin, body type)
first. `GET /cluster` is served from the agent's cluster cache (`ClusterDocuments`): no read
of the whole cluster per request, and one document per change of what it shows however many ask.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.api.auth import audit
from agent.api.errors import query_int
from pdsupervisor.api.openapi import openapi_document, openapi_yaml
from pdsupervisor.core.cluster_view import change_impact, cluster_document
from pdsupervisor.core.document_json import DOCUMENT_JSON
from pdsupervisor.core.documents import (
    ClusterDocument,
    ErrorBody,
    Event,
    EventsDocument,
    FieldProblem,
    SubmitAnswer,
    nodes_document,
)
from pdsupervisor.core.etcd_members import ReplaceRequest
from pdsupervisor.core.observed import Observed
from pdsupervisor.core.spec import SpecError, load_spec
from pdsupervisor.store.cache import ClusterCache
from pdsupervisor.store.cluster import SubmitResult, observe, observe_nodes, request_stop, submit_spec
from pdsupervisor.store.etcd import Store, StoreUnavailable
from pdsupervisor.store.etcd_health import ReplaceRefused, etcd_health, replace_member

Handler = Callable[[web.Request, Store], Awaitable[web.StreamResponse]]
__all__ = ["cluster_routes", "openapi_document"]
MAX_EVENTS = 1000  # per GET /events
OWN_WRITE_WAIT_S = 2.0  # GET /cluster waits this long for the cache to show this agent's last write
DOCUMENT_MAX_AGE_S = 5.0  # a quiet cluster's document, once made, is made again after this (its timeouts move)


class ClusterDocuments:
    """`GET /cluster`'s document, made from the agent's cluster cache at most once per change
    of what it shows (`shown_revision`; and per DOCUMENT_MAX_AGE_S: problems such as timeouts
    depend on the clock): concurrent requests share one computation, made in a thread so the agent's loop (its lease
    refreshes) is not held by a large cluster's plan."""

    def __init__(self, cache: ClusterCache) -> None:
        self.cache = cache
        self.computed = 0  # documents made (for tests and the scale benchmark)
        self._revision = -1
        self._made_at = 0.0
        self._doc: asyncio.Future[tuple[ClusterDocument, bytes]] | None = None

    async def get(self) -> ClusterDocument:
        return (await self._made())[0]

    async def body(self) -> bytes:
        """The document as the JSON `GET /cluster` answers (made with it)."""
        return (await self._made())[1]

    async def _made(self) -> tuple[ClusterDocument, bytes]:
        cache, store = self.cache, self.cache.store
        await cache.current(OWN_WRITE_WAIT_S)  # etcd away: a 503 that says so, not an old document
        # read-your-writes: a spec just submitted through this agent is in the document
        if not await cache.wait_past(store.written_revision - 1, OWN_WRITE_WAIT_S):
            await cache.read_again(store.written_revision)
        doc = self._doc
        shown = shown_revision(cache)
        stale = doc is None or self._revision != shown or (
            doc.done() and (doc.exception() is not None or time.monotonic() - self._made_at > DOCUMENT_MAX_AGE_S))
        if stale:
            self._revision = shown
            self.computed += 1
            doc = self._doc = asyncio.ensure_future(asyncio.to_thread(_make, cache.observed(), time.time()))
            doc.add_done_callback(self._ready_at_now)
        assert doc is not None
        return await asyncio.shield(doc)  # one request going away does not cancel the others'

    def _ready_at_now(self, _doc: asyncio.Future[tuple[ClusterDocument, bytes]]) -> None:
        self._made_at = time.monotonic()  # its age counts from when it was ready, however long it took


def shown_revision(cache: ClusterCache) -> int:
    """The last revision that changed a key the document shows (the spec, the leader, members,
    assignments, statuses; a resync counts as changing them all): events/ are not in it, and
    the coordinator writes one per decision, so a document per revision would be made again
    for each of them, showing the same."""
    return max(cache.changed_at().values())


def _make(obs: Observed, now: float) -> tuple[ClusterDocument, bytes]:
    doc = cluster_document(obs, now)
    return doc, DOCUMENT_JSON.body(doc)  # the JSON of the rows of unchanged nodes kept


def cache_context(cache: ClusterCache) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context that closes `cache` when the app stops (it starts on first use)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await cache.close()

    return ctx


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


def get_cluster(documents: ClusterDocuments) -> Handler:
    async def handler(request: web.Request, store: Store) -> web.Response:
        # the cache's view at one revision, the leader key in it: the cluster as it was then
        return web.Response(body=await documents.body(), content_type="application/json")

    return handler


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


def cluster_routes(store: Store, documents: ClusterDocuments | None = None) -> list[web.RouteDef]:
    """The routes; `documents` from the agent's shared cache (else a cache of their own, started
    on the first `GET /cluster`, stopped after a minute unasked)."""
    documents = documents or ClusterDocuments(ClusterCache(store, linger_s=60.0))
    return [
        web.post("/cluster/start", _bind(store, start_cluster)),
        web.post("/cluster/stop", _bind(store, stop_cluster)),
        web.get("/cluster", _bind(store, get_cluster(documents))),
        web.get("/nodes", _bind(store, get_nodes)),
        web.get("/events", _bind(store, get_events)),
        web.get("/etcd", _bind(store, get_etcd)),
        web.post("/etcd/replace-member", _bind(store, replace_etcd_member)),
        web.get("/openapi.yaml", openapi),
    ]
