"""Live membership from etcd: engines joining or leaving change routing without a restart.

Engines are the `ready` prefill/decode `ProcessStatus` entries of nodes whose member key
exists (a member key gone = node lost = no traffic). Read once, then watch the cluster
prefix from the next revision and re-read (debounced) on any relevant change. When etcd is
away the last known routing stays in force and the source keeps reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pdsupervisor.models import NodeFacts, NodeStatus, ProcessState
from pdsupervisor.proxy.instances import ROLES, Registry
from pdsupervisor.store import Store, StoreUnavailable

log = logging.getLogger("pdsupervisor.proxy.etcd")

DEBOUNCE_S = 0.05


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
                if host in ("0.0.0.0", "::", "[::]", ""):
                    host = facts.ip  # a wildcard bind is reached through the node's address
                out[proc.role].append(f"{host}:{port}")
    return out


class EtcdSource:
    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self.synced = asyncio.Event()
        self._relevant = (store.keys.members, store.keys.status)

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self.store.connect()
                revision = await self.refresh()
                backoff = 0.5
                await self._watch(revision)
            except asyncio.CancelledError:
                raise
            except (*StoreUnavailable, OSError) as exc:
                log.warning("etcd unavailable (%r); keeping the current routing, retrying in %.1fs", exc, backoff)
            except Exception:  # a bad record must not stop membership updates for good
                log.exception("membership watch failed; retrying in %.1fs", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def refresh(self) -> int:
        """Read statuses and members; apply them; return the revision to watch after."""
        _, revision = await self.store.get_prefix(self.store.keys.spec)
        statuses = await self.store.statuses()
        members = await self.store.members()
        engines = engines_from(statuses, members)
        for role in ROLES:
            before = [i.endpoint for i in self.registry.instances(role)]
            if before != engines[role]:
                log.info("%s instances: %s", role, " ".join(engines[role]) or "(none)")
            self.registry.set_endpoints(role, engines[role])
        self.synced.set()
        return revision

    async def _watch(self, revision: int) -> None:
        dirty = asyncio.Event()

        async def refresher() -> None:
            while True:
                await dirty.wait()
                await asyncio.sleep(DEBOUNCE_S)
                dirty.clear()
                await self.refresh()

        task = asyncio.ensure_future(refresher())
        try:
            async for ev in self.store.watch_prefix(self.store.keys.root, revision + 1):
                if ev.key.startswith(self._relevant):
                    dirty.set()
                if task.done():
                    task.result()  # re-raise the refresher's failure into run()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
