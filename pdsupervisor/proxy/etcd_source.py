"""Live membership from etcd: engines joining or leaving change routing without a restart.

Engines are the `ready` prefill/decode `ProcessStatus` entries of nodes whose member key
exists (a member key gone = node lost = no traffic). Read both in one snapshot, then watch
the cluster prefix from the revision after it and re-read (debounced) on any relevant
change. When etcd is away the last known routing stays in force and the source keeps
reconnecting.

In the proxy the source is app state (`MEMBERSHIP`) run by the `membership` cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from pdsupervisor.aio.serve import is_wildcard, stop_tasks
from pdsupervisor.aio.wait import wait_event
from pdsupervisor.core.models import NodeFacts, NodeStatus, ProcessState
from pdsupervisor.host.files import atomic_write
from pdsupervisor.proxy.instances import ROLES, Registry
from pdsupervisor.store.cluster import observe_membership
from pdsupervisor.store.etcd import Store, StoreUnavailable, WatchLost

log = logging.getLogger("pdsupervisor.proxy.etcd")

DEBOUNCE_S = 0.05
RESYNC_S = 30.0  # re-read even without events: a watch can miss or lose them


def engines_from(statuses: dict[str, NodeStatus], members: dict[str, NodeFacts]) -> dict[str, list[str]]:
    """Endpoints per role, from what agents observe, restricted to live members."""
    out: dict[str, list[str]] = {r: [] for r in ROLES}
    for node in sorted(statuses):
        facts = members.get(node)
        if facts is None or not statuses[node].current_for(facts):
            continue
        for proc in statuses[node].processes:
            if proc.role in out and proc.state == ProcessState.ready and proc.endpoint:
                host, _, port = proc.endpoint.rpartition(":")
                if is_wildcard(host):
                    host = facts.ip  # a wildcard bind is reached through the node's address
                out[proc.role].append(f"{host}:{port}")
    return out


class EtcdSource:
    """Routing from etcd. With `cache`, the last routing is kept on disk, so a proxy that
    restarts while etcd is away serves the engines it last knew instead of nothing."""

    def __init__(self, store: Store, registry: Registry, cache: Path | None = None) -> None:
        self.store = store
        self.registry = registry
        self.cache = cache
        self._relevant = (store.keys.members, store.keys.status)
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
            self.registry.set_endpoints(role, routing[role])
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
        while True:
            try:
                await self.store.connect()
                revision = await self.refresh()
                backoff = 0.5
                await self._watch(revision)
            except StoreUnavailable as exc:
                log.warning("etcd unavailable (%r); keeping the current routing, retrying in %.1fs", exc, backoff)
            except Exception:  # a bad record must not stop membership updates for good
                log.exception("membership watch failed; retrying in %.1fs", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def refresh(self) -> int:
        """Read members and statuses in one snapshot; apply them; return its revision (the
        watch from the next one misses nothing written after the read)."""
        seen = await observe_membership(self.store)
        engines = engines_from(seen.statuses, seen.members)
        for role in ROLES:
            before = [i.endpoint for i in self.registry.instances(role)]
            if before != engines[role]:
                log.info("%s instances: %s", role, " ".join(engines[role]) or "(none)")
                self.registry.set_endpoints(role, engines[role])
        self._save_cache(engines)
        return seen.revision

    async def _watch(self, revision: int) -> None:
        """Watch, refresh on relevant events (debounced) and every RESYNC_S regardless."""
        dirty = asyncio.Event()

        async def watcher() -> None:
            async for ev in self.store.watch_prefix(self.store.keys.root, revision + 1):
                if ev.key.startswith(self._relevant):
                    dirty.set()
            raise WatchLost("membership watch ended")

        async def refresher() -> None:
            while True:
                await wait_event(dirty, RESYNC_S)
                await asyncio.sleep(DEBOUNCE_S)
                dirty.clear()
                await self.refresh()

        tasks = [asyncio.ensure_future(watcher()), asyncio.ensure_future(refresher())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # whichever failed: back to run(), which re-reads and re-watches
        finally:
            for task in tasks:
                task.cancel()
            # wait for both to end; their errors stay here (the one that matters is raised
            # above), while a cancellation of this task still interrupts the wait
            await asyncio.gather(*tasks, return_exceptions=True)


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
