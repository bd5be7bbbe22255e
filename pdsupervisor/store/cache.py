"""A watch-fed cache of one cluster's keys: read once, then kept current by applying watch events.

Why: re-reading the whole cluster prefix on every change costs work proportional to the
cluster per change (quadratic as the cluster grows), and one answer of every assignment of a
1,024-node cluster is ~10 MB. Here the first read is paged at one revision
(`Store.range_paged`: every answer small), decoded in a thread (off the event loop), then the
prefix is watched from the revision after it and each event decodes only the key that
changed. A watch that ends (its revision compacted away, the connection dropped, etcd away)
is followed by a fresh read (resync); meanwhile the last state stays readable and `synced`
is False.

What it keeps: the spec record, the leader key, members/, assignments/, status/ (decoded
models, one per key); events/ only move the revision. A key that does not decode is logged
and left out (as if absent): one bad record never stops the cache.

Readers: `observed()` (the coordinator and `GET /cluster`), `membership()` (the proxy),
`changed_since(revision)` (which kinds of keys changed after a revision a consumer looked
at: a status-only change needs no new plan), `wait_past(revision)` (the next change).

It runs only while used: `ensure()` starts it (and waits for the first read); with
`linger_s` it stops by itself once nobody called `ensure()` for that long, so an agent that
is neither leading nor asked for `GET /cluster` does not watch every status write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ValidationError

from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus
from pdsupervisor.core.observed import Observed, SpecRecord
from pdsupervisor.store.cluster import Membership
from pdsupervisor.store.etcd import PAGE_KEYS, Keys, KeyValue, Store, StoreUnavailable, WatchEvent, WatchLost
from pdsupervisor.store.gateway import prefix_end

log = logging.getLogger("pdsupervisor.store.cache")

Kind = Literal["spec", "leader", "members", "assignments", "status"]
KINDS: tuple[Kind, ...] = ("spec", "leader", "members", "assignments", "status")
PLAN_INPUTS: frozenset[Kind] = frozenset({"spec", "leader", "members", "assignments"})  # all but status

RESYNC_BACKOFF_S = (0.2, 5.0)  # first and longest wait before reading again after a lost watch


class CacheNotReady(StoreUnavailable):
    """The cache has not completed a read of the cluster (etcd away, or still reading)."""


class _Decoded:
    """The decoded records of one cluster's keys (one model per key), changed key by key."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.record: SpecRecord | None = None
        self.record_revision = 0
        self.leader: str | None = None
        self.members: dict[str, NodeFacts] = {}
        self.assignments: dict[str, NodeAssignment] = {}
        self.statuses: dict[str, NodeStatus] = {}

    def kind(self, key: str) -> Kind | None:
        k = self.keys
        if key == k.spec:
            return "spec"
        if key == k.leader:
            return "leader"
        for kind, prefix in (("members", k.members), ("assignments", k.assignments), ("status", k.status)):
            if key.startswith(prefix):
                return kind  # type: ignore[return-value]  # one of the three literals
        return None  # events/, or a key this version does not know

    def put(self, key: str, value: bytes, mod_revision: int, model: BaseModel | None = None) -> None:
        """Decode `value` into the key's record; one that does not decode is logged and left out.
        `model`: the record `value` is the JSON of (this process wrote it): kept, not decoded."""
        kind = self.kind(key)
        try:
            if kind == "spec":
                record = model if isinstance(model, SpecRecord) else SpecRecord.model_validate_json(value)
                self.record, self.record_revision = record, mod_revision
            elif kind == "leader":
                self.leader = value.decode()
            elif kind == "members":
                self.members[key[len(self.keys.members):]] = NodeFacts.model_validate_json(value)
            elif kind == "assignments":
                self.assignments[key[len(self.keys.assignments):]] = (
                    model if isinstance(model, NodeAssignment) else NodeAssignment.model_validate_json(value))
            elif kind == "status":
                self.statuses[key[len(self.keys.status):]] = NodeStatus.model_validate_json(value)
        except (ValidationError, UnicodeDecodeError) as exc:
            log.error("cluster cache: %s does not decode, left out: %s", key,
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.delete(kind, key)

    def delete(self, kind: Kind | None, key: str) -> None:
        if kind == "spec":
            self.record, self.record_revision = None, 0
        elif kind == "leader":
            self.leader = None
        elif kind == "members":
            self.members.pop(key[len(self.keys.members):], None)
        elif kind == "assignments":
            self.assignments.pop(key[len(self.keys.assignments):], None)
        elif kind == "status":
            self.statuses.pop(key[len(self.keys.status):], None)


def _decode_all(keys: Keys, kvs: list[KeyValue]) -> _Decoded:
    decoded = _Decoded(keys)
    for kv in kvs:
        decoded.put(kv.key, kv.value, kv.mod_revision)
    return decoded


class ClusterCache:
    """The keys of one cluster as of `revision`, kept current from a watch (see the module)."""

    def __init__(self, store: Store, *, page_size: int = PAGE_KEYS, linger_s: float | None = None) -> None:
        self.store = store
        self.keys = store.keys
        self.page_size = page_size
        self.linger_s = linger_s
        self.revision = 0  # the last store revision applied (0: never read)
        self._synced = asyncio.Event()  # a read completed and its watch has not ended since
        self.resyncs = 0  # reads after the first (compactions, lost watches)
        self.last_error = ""  # why the last read or watch ended
        self._state = _Decoded(self.keys)
        self._changed_at: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._advanced = asyncio.Event()  # set (and replaced) each time `revision` moves
        self._loaded = asyncio.Event()
        self._read_again = asyncio.Event()
        self._read_at = 0  # the revision of the last full read
        self._task: asyncio.Task[None] | None = None
        self._used_at = time.monotonic()
        self._observed: Observed | None = None
        self._membership: Membership | None = None
        self._written: dict[str, tuple[bytes, BaseModel]] = {}  # see `encode`
        self.reused = 0  # watch events whose record was this process's own model (not decoded)

    # the records as of `revision` (read-only for callers: `observed()` gives copies)
    @property
    def record(self) -> SpecRecord | None:
        return self._state.record

    @property
    def record_revision(self) -> int:
        return self._state.record_revision

    @property
    def leader(self) -> str | None:
        return self._state.leader

    @property
    def members(self) -> dict[str, NodeFacts]:
        return self._state.members

    @property
    def assignments(self) -> dict[str, NodeAssignment]:
        return self._state.assignments

    @property
    def statuses(self) -> dict[str, NodeStatus]:
        return self._state.statuses

    @property
    def synced(self) -> bool:
        """A read completed and its watch has not ended since: the cache is current."""
        return self._synced.is_set()

    async def current(self, timeout: float) -> None:
        """`ensure()`, then wait up to `timeout` for the cache to be current (a lost watch read
        again); CacheNotReady, saying why, if it is not: a reader must not decide from a state
        that stopped following etcd."""
        await self.ensure()
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        except TimeoutError:
            raise CacheNotReady(f"the cluster cache of {self.store.cluster} is not following etcd: "
                                f"{self.last_error or 'reading again'}") from None

    # ---- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start reading and watching in the background (no-op while running)."""
        self._used_at = time.monotonic()
        if self._task is None or self._task.done():
            self._loaded.clear()
            self._task = asyncio.create_task(self._run(), name=f"cluster-cache-{self.store.cluster}")

    async def ensure(self, timeout: float | None = None) -> None:
        """Start if needed and wait until a read of the cluster completed (`timeout`: the
        store's request timeout, times a few for a paged read); CacheNotReady if it did not."""
        self.start()
        if self._loaded.is_set():
            return
        try:
            async with asyncio.timeout(timeout if timeout is not None else 3 * self.store.timeout_s):
                await self._loaded.wait()
        except TimeoutError:
            raise CacheNotReady(f"the cluster cache of {self.store.cluster} has not read the cluster yet"
                                + (f": {self.last_error}" if self.last_error else "")) from None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._synced.clear()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        """Read and watch until cancelled, or until unused for `linger_s`."""
        watch = asyncio.create_task(self._sync_forever())
        try:
            while not watch.done():
                if self.linger_s is not None and time.monotonic() - self._used_at > self.linger_s:
                    log.info("cluster cache of %s unused for %.0f s: stopped", self.store.cluster, self.linger_s)
                    return
                await asyncio.wait([watch], timeout=min(self.linger_s or 60.0, 60.0) / 4)
            watch.result()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            self._synced.clear()
            self._loaded.clear()

    async def _sync_forever(self) -> None:
        backoff = RESYNC_BACKOFF_S[0]
        while True:
            try:
                self._read_again.clear()
                await self._load()
                backoff = RESYNC_BACKOFF_S[0]
                await self._follow()
                continue  # asked to read again: at once
            except (StoreUnavailable, WatchLost) as exc:  # etcd away, compacted, cut off: read again
                self.last_error = str(exc) or type(exc).__name__
                log.warning("cluster cache of %s: %s; reading again in %.1f s",
                            self.store.cluster, self.last_error, backoff)
            except Exception as exc:  # a bug or a transport surprise must not stop the cache for good
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("cluster cache of %s failed; reading again in %.1f s", self.store.cluster, backoff)
            finally:
                self._synced.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESYNC_BACKOFF_S[1])

    async def _follow(self) -> None:
        """Apply the watch's events until it ends (raises) or `read_again()` is asked (returns)."""

        async def watch() -> None:
            async for event in self.store.watch_prefix(self.keys.root, self.revision + 1):
                self._apply(event)
            raise WatchLost("watch ended")

        watching = asyncio.create_task(watch())
        asked = asyncio.create_task(self._read_again.wait())
        try:
            await asyncio.wait([watching, asked], return_when=asyncio.FIRST_COMPLETED)
            if watching.done():
                watching.result()
        finally:
            for task in (watching, asked):
                task.cancel()
            await asyncio.gather(watching, asked, return_exceptions=True)

    async def read_again(self, at_least: int = 0, timeout: float | None = None) -> None:
        """Read the whole cluster again now and wait for it (a reader that must see revision
        `at_least`, which the watch has not brought: e.g. a write whose revision touched no key
        of ours). A read already under way when asked may predate it: then once more."""
        for _ in range(3):
            self._read_again.set()
            self._loaded.clear()
            await self.ensure(timeout)
            if self.revision >= at_least:
                return

    # ---- reading and applying ----------------------------------------------------------

    async def _load(self) -> None:
        """Every key but events/, in pages, at one revision: [root, events/) and after events/.
        Decoded in a thread: thousands of records must not hold the event loop (lease refreshes)."""
        keys = self.keys
        before, revision = await self.store.range_paged(keys.root, keys.events.encode(), page_size=self.page_size)
        after, _ = await self.store.range_paged(prefix_end(keys.events).decode(), prefix_end(keys.root),
                                                revision=revision, page_size=self.page_size)
        self._state = await asyncio.to_thread(_decode_all, keys, [*before, *after])
        self._written.clear()
        if self._read_at:
            self.resyncs += 1
        self._read_at = revision
        self._changed_at = dict.fromkeys(KINDS, revision)  # anything may have changed meanwhile
        self._synced.set()
        self.last_error = ""
        self._observed = self._membership = None
        self._advance(revision)
        self._loaded.set()

    def _apply(self, event: WatchEvent) -> None:
        if event.revision <= self._read_at:
            return  # already in what was read (a txn's events share one revision: not `self.revision`)
        kind = self._state.kind(event.key)
        if kind is not None:
            written = self._written.pop(event.key, None)
            if event.value is None:
                self._state.delete(kind, event.key)
            elif written is not None and written[0] == event.value:
                self.reused += 1
                self._state.put(event.key, event.value, event.revision, written[1])
            else:
                self._state.put(event.key, event.value, event.revision)
            self._changed_at[kind] = event.revision
            self._observed = self._membership = None  # a txn's later events share its revision
        self._advance(event.revision)

    def _advance(self, revision: int) -> None:
        if revision <= self.revision and self.revision:
            return
        self.revision = revision
        self._observed = self._membership = None
        self._advanced.set()
        self._advanced = asyncio.Event()

    def encode(self, key: str, model: SpecRecord | NodeAssignment) -> bytes:
        """The JSON to write at `key` (as `Store` writes a model), remembered with `model`: when
        the watch brings exactly these bytes back for `key`, the cache keeps `model` instead of
        decoding them. Why: a leader starting 1,024 nodes writes ~9 MB of assignments, and
        decoding them back on the agent's event loop held it for seconds, its lease refreshes
        and API included; the plan's own objects also let `KnownEqual` compare by identity.
        The caller must not change `model` afterwards. Forgotten when the event comes (or does
        not match: someone else wrote the key since) and on every full read."""
        value = model.model_dump_json().encode()
        self._written[key] = (value, model)
        return value

    # ---- what readers ask --------------------------------------------------------------

    def touch(self) -> None:
        """Count as a use (see `linger_s`) without waiting for anything."""
        self._used_at = time.monotonic()

    def observed(self) -> Observed:
        """The cluster as of `revision`, in the shape `store.cluster.observe` reads it (its
        dicts are copies: later events do not change it). One per revision."""
        if self._observed is None:
            self._observed = Observed(record=self.record, members=dict(self.members),
                                      assignments=dict(self.assignments), statuses=dict(self.statuses),
                                      record_revision=self.record_revision, revision=self.revision,
                                      leader=self.leader)
        return self._observed

    def membership(self) -> Membership:
        """What the proxy routes from, as of `revision` (copies, one per revision)."""
        if self._membership is None:
            obs = self.observed()
            self._membership = Membership(members=obs.members, statuses=obs.statuses,
                                          assignments=obs.assignments, revision=obs.revision)
        return self._membership

    def changed_since(self, revision: int) -> frozenset[Kind]:
        """The kinds of keys that changed after `revision` (everything after a resync past it)."""
        return frozenset(k for k, at in self._changed_at.items() if at > revision)

    def changed_at(self) -> Mapping[Kind, int]:
        """Per kind, the revision it last changed at."""
        return dict(self._changed_at)

    async def wait_past(self, revision: int, timeout: float) -> bool:
        """Wait until `revision` is behind the cache (it applied a later one); False when
        `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                while self.revision <= revision:
                    await self._advanced.wait()
        except TimeoutError:
            return False
        return True
