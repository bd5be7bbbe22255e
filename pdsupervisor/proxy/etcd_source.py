"""Live membership from etcd: engines joining or leaving change routing without a restart.

Membership from etcd is discovery; whether an engine answers is the proxy's own business (its
probes and its requests' outcomes, `server` and `exchange`): serving never waits on the
control plane. So an engine stays in rotation while its node's agent is away (killed,
restarting, its lease lapsed in an etcd outage) and leaves it when its current agent says it is
not ready or no longer runs it, or when the coordinator plans it away (see `engines_from`).
Members, statuses and assignments come from a watch-fed `ClusterCache` (read once in pages,
then kept current by the watch's events, read again when the watch is lost): the routing is
worked out again (debounced) once per cache revision that changed one of them, without
reading the cluster again. When etcd is away the last known routing stays in force and the
cache keeps reconnecting.

In the proxy the source is app state (`MEMBERSHIP`) run by the `membership` cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from pdsupervisor.aio.serve import is_wildcard, stop_tasks
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessState
from pdsupervisor.host.files import atomic_write
from pdsupervisor.proxy.instances import ROLES, Registry, Source
from pdsupervisor.store.cache import ClusterCache, Kind
from pdsupervisor.store.etcd import Store, StoreUnavailable

log = logging.getLogger("pdsupervisor.proxy.etcd")

DEBOUNCE_S = 0.05
REFRESH_SHARE = 0.1  # of the proxy's time, at most, spent working out the routing under a stream of changes
ROUTING_INPUTS: frozenset[Kind] = frozenset({"members", "status", "assignments"})


Routing = dict[str, dict[str, Source]]  # role -> endpoint -> why it is routed, in node order


def engines_from(statuses: dict[str, NodeStatus], members: dict[str, NodeFacts],
                 assignments: dict[str, NodeAssignment]) -> Routing:
    """The engines to route to, per role, each with its source.

    - A node whose status is current (written under the member lease its agent holds now):
      the engines it reports `ready` (source `agent`). Not ready, stopping, or gone from the
      status: out.
    - A node whose status is not current (member key gone, or the status written under
      another lease: the agent died, lapsed, or restarted and has not reported yet): the
      engines its last status said were `ready` that its assignment still holds, same name and
      endpoint (source `last-known`). No assignment at all (the cluster stopped, the node
      planned away): none.

    A wildcard bind is reached through the node's registered address; without a member key
    that address is unknown, and such an engine is left out.
    """
    out: Routing = {r: {} for r in ROLES}
    for node in sorted(statuses):
        status, facts = statuses[node], members.get(node)
        source: Source = "agent"
        planned: set[tuple[str, str | None]] | None = None  # None: whatever the agent reports
        if not status.current_for(facts):
            if (assignment := assignments.get(node)) is None:
                continue
            source, planned = "last-known", {(p.name, p.endpoint) for p in assignment.processes}
        for proc in status.processes:
            if proc.role not in out or proc.state != ProcessState.ready or not proc.endpoint:
                continue
            if planned is not None and (proc.name, proc.endpoint) not in planned:
                continue
            host, _, port = proc.endpoint.rpartition(":")
            if is_wildcard(host):
                if facts is None:
                    continue
                host = facts.ip
            out[proc.role].setdefault(f"{host}:{port}", source)
    return out


def _describe(engines: dict[str, Source]) -> str:
    """`a b c (last-known: b)` for the log."""
    if not engines:
        return "(none)"
    away = [ep for ep, source in engines.items() if source == "last-known"]
    return " ".join(engines) + (f" (last-known: {' '.join(away)})" if away else "")


class EtcdSource:
    """Routing from etcd. With `cache`, the last routing is kept on disk, so a proxy that
    restarts while etcd is away serves the engines it last knew instead of nothing."""

    def __init__(self, store: Store, registry: Registry, cache: Path | None = None) -> None:
        self.store = store
        self.registry = registry
        self.cache = cache
        self.cluster = ClusterCache(store)  # runs as long as the source
        self.refreshes = 0  # routings worked out (one per relevant cache revision)
        self.seen_revision = 0  # the cache revision the routing was last checked against
        self._cached: dict[str, list[str]] | None = None

    def load_cache(self) -> None:
        """Start from the cached routing (before etcd answers), when there is one."""
        if self.cache is None:
            return
        try:
            engines = json.loads(self.cache.read_text())
            routing: dict[str, list[str]] = {role: [str(e) for e in engines.get(role, [])] for role in ROLES}
        except (OSError, ValueError, AttributeError):
            return
        for role in ROLES:
            self.registry.set_endpoints(role, dict.fromkeys(routing[role], "cached"))
        self._cached = routing
        log.info("serving the cached routing until etcd answers: %s", routing)

    def _save_cache(self, engines: dict[str, list[str]]) -> None:
        if self.cache is None or engines == self._cached:
            return
        try:
            atomic_write(self.cache, json.dumps(engines).encode())
            self._cached = engines
        except OSError as exc:
            log.warning("cannot write the routing cache %s: %s", self.cache, exc)

    async def run(self) -> None:
        backoff = 0.5
        try:
            while True:
                try:
                    await self.store.connect()
                    await self.cluster.ensure()
                    backoff = 0.5
                    await self._follow()
                except StoreUnavailable as exc:
                    log.warning("etcd unavailable (%r); keeping the current routing, retrying in %.1fs", exc, backoff)
                except Exception:  # a bug must not stop membership updates for good
                    log.exception("membership source failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            await self.cluster.close()

    def refresh(self) -> int:
        """Apply the routing of the cache's members, statuses and assignments; their revision.
        No I/O: the cache is kept current by its watch."""
        seen = self.cluster.membership()
        routing = engines_from(seen.statuses, seen.members, seen.assignments)
        self.refreshes += 1
        for role in ROLES:
            before = [(i.endpoint, i.source) for i in self.registry.instances(role)]
            if before != list(routing[role].items()):
                log.info("%s instances: %s", role, _describe(routing[role]))
                self.registry.set_endpoints(role, routing[role])
        self._save_cache({role: list(routing[role]) for role in ROLES})
        return seen.revision

    async def _follow(self) -> None:
        """Refresh now, then after each cache revision that changed members, statuses or
        assignments (debounced: a burst of status writes is one refresh)."""
        took = 0.0
        seen = self.seen_revision = self.refresh()
        while True:
            await self.cluster.wait_past(seen, 60.0)
            # coalesce: a refresh costs O(engines) (~30 ms for 8,192 on a busy core), so under
            # constant status writes it runs at most REFRESH_SHARE of the time
            await asyncio.sleep(max(DEBOUNCE_S, took * (1 / REFRESH_SHARE - 1)))
            if self.cluster.changed_since(seen) & ROUTING_INPUTS:
                started = time.perf_counter()
                seen = self.refresh()
                took = time.perf_counter() - started
            else:
                seen = self.cluster.revision
            self.seen_revision = seen


MEMBERSHIP = web.AppKey("membership", EtcdSource)


async def membership(app: web.Application) -> AsyncIterator[None]:
    """The proxy's cleanup context for `app[MEMBERSHIP]`: the cached routing first (before etcd
    answers), the watch while the app runs; on the way out the watch stops and the store closes."""
    source = app[MEMBERSHIP]
    source.load_cache()
    task = asyncio.create_task(source.run())
    yield
    await stop_tasks([task], "the etcd membership source", log)
    with contextlib.suppress(Exception):
        await source.store.close()
