"""The coordinator: one loop, in every agent, that acts only while it holds the leader key.

Desired state in (spec record + members + status), assignments out. Patroni's rules:
the leader key is taken with `create_revision == 0` under our own lease, refreshed every
cycle, and every write is a transaction that checks we still hold it, so a deposed
coordinator cannot write. When the leader dies its lease expires and another agent's loop
takes the key within about one TTL and carries on from what is in etcd.

Each `cycle()` returns its `Outcome` (Patroni's `run_cycle` sentence); `run()` logs it when
it differs from the last one, so the agent's log shows each decision once, and tells
`on_cycle` (the agent's metrics) of every cycle and how long it took. For the metrics too:
`is_leader`, `view` (the phase and which assigned nodes are registered, as the leader last
saw them; None on a follower) and `assignment_writes`.

The cluster spec's `policy.lease_ttl_s` is asked of the agent's `LeaseState` (registration
moves the member lease onto it) and governs the leader lease from the next election.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import structlog

from agent.lease import LeaseState
from agent.process.child import probe_once
from pdsupervisor.aio.wait import wait_event
from pdsupervisor.core.cluster_view import DESIRED, Changes, Desired, KnownEqual, changes, phase_of
from pdsupervisor.core.documents import Phase
from pdsupervisor.core.events import ClusterEvent, new_leader, observed_events, rollout_halted, write_events
from pdsupervisor.core.models import NodeAssignment, ProcessSpec
from pdsupervisor.core.observed import Observed, SpecRecord
from pdsupervisor.core.pacing import MIN_GAP_S, cycle_gap
from pdsupervisor.core.planner import ENGINE_ROLES
from pdsupervisor.core.spec import PolicySpec
from pdsupervisor.store.cache import ClusterCache, Kind
from pdsupervisor.store.cluster import read_record
from pdsupervisor.store.etcd import EVENTS_KEPT, RequestTooLarge, Store, StoreUnavailable, lease_refresh_interval

log = structlog.get_logger("coordinator")
ANSWER_TIMEOUT_S = 2.0  # a probe of a node away never holds a cycle longer, whatever the spec's probe says
CATCH_UP_S = 2.0  # how long a leader waits for its cluster cache to show its own last write
SLOW_S = 1.0  # a cycle's deciding, or a leader write, taking longer is logged with its parts
CACHE_LINGER_S = 120.0  # a cache of our own stops this long after we last led
NODE_LOSS_GRACE_S: float = PolicySpec.model_fields["node_loss_grace_s"].default

OutcomeKind = Literal[
    "follower",  # another agent holds the leader key
    "acquired",  # took the leader key in this cycle (and then did what the message says)
    "unchanged",  # leading, nothing to write
    "waiting",  # leading, the spec cannot be planned yet: the message says what is missing
    "wrote",  # leading, wrote assignments and/or the spec record
    "changed-concurrently",  # the spec record changed while deciding: nothing written, decide again
    "deposed",  # the leader key is no longer ours (a fenced write, or our lease expired)
    "stepped-down",  # handed the key over, to take it again under the spec's lease TTL
    "unavailable",  # etcd did not answer: not leading until it does
    "refused",  # leading, etcd refused a write for its size: what was refused is named; tried again next cycle
]
WARNINGS: frozenset[OutcomeKind] = frozenset({"deposed", "unavailable", "refused"})
Held = Literal["kept", "acquired", "expired", "taken", "follower"]


@dataclass(frozen=True)
class Outcome:
    """What one cycle decided, in words for the agent's log."""

    kind: OutcomeKind
    message: str


@dataclass(frozen=True)
class LeaderView:
    """What the leader saw in its last cycle: the phase, each node with an assignment and
    whether it holds its member key (False: lost or unmanaged), the unmanaged ones, and the
    rollout (engines of each role still to change; why it halted)."""

    phase: Phase
    registered: dict[str, bool]
    unmanaged: tuple[str, ...] = ()
    outdated: tuple[tuple[str, int], ...] = ()  # (role, engines not yet assigned their planned spec)
    halted: str | None = None
    refused: str | None = None  # etcd refused this leader's last write for its size: why


@dataclass(frozen=True)
class Decision:
    """What one cycle decided from one observation: pure, so it may run off the event loop."""

    desired: Desired
    phase: Phase
    todo: Changes


def decide(seen: Observed, obs: Observed, now: float, known: KnownEqual | None = None) -> Decision:
    """`desired_state`, its phase and what to write (`seen`: as read; `obs`: with this
    leader's unmanaged and recently lost nodes: the same assignments, so one `changes` serves
    both). `known`: the deciding loop's `KnownEqual`."""
    desired = DESIRED.get(obs, now)  # made once per observation, with `GET /cluster` of this agent
    todo = changes(seen, desired, known)
    return Decision(desired, phase_of(obs, desired, todo), todo)


class Coordinator:
    def __init__(self, store: Store, name: str, member_lease: LeaseState, *, events_kept: int = EVENTS_KEPT,
                 cache: ClusterCache | None = None) -> None:
        """`cache`: the cluster cache the leader reads (shared with the agent's `GET /cluster`);
        without one the coordinator keeps its own."""
        self.store = store
        self.cache = cache or ClusterCache(store, linger_s=CACHE_LINGER_S)
        self._own_cache = cache is None
        # HOOK (plan memoization): the kinds of keys that changed between the revisions of the
        # leader's last two reads; {"status"} alone means no input of the plan changed. Every
        # kind after a new leader's first read.
        self.changed: frozenset[Kind] = frozenset()
        self.name = name
        self.member_lease = member_lease  # every agent follows the spec's lease TTL, leader or not
        self.ttl = member_lease.ttl  # of our leader lease
        self.events_kept = events_kept
        self._events_added = False
        self.lease: int | None = None  # our leader lease (a follower holds one too, to try with)
        self.is_leader = False
        self.view: LeaderView | None = None
        self.assignment_writes = 0  # assignment keys put or deleted by this agent as leader
        self.on_cycle: Callable[[Outcome | None, float], None] | None = None  # None: the cycle raised
        self._last_refresh = 0.0
        self.busy_s = 0.0  # the last cycle's reading and deciding (not its waits on probes or writes): paces the next
        self._refused: str | None = None  # why etcd refused our last write, while it does
        self._known = KnownEqual()  # assignments found as wanted, by identity (one decision at a time uses it)
        self._changed = asyncio.Event()
        self._previous: Observed | None = None  # what this leader saw last (None: a new leader)
        self._halted: str | None = None  # why the rollout halted, as this leader last told it
        self._answered_at: dict[str, float] = {}  # node away -> when one of its engines last answered (monotonic)
        self._away_since: dict[str, float] = {}  # node away -> when this leader first saw it away (monotonic)
        # The `... is the coordinator` event was written for our current hold of the key: taking
        # the key back ourselves (after a failed cycle, or anew under the spec's lease TTL) is
        # no news. Cleared once another agent is seen holding it.
        self._announced = False

    @property
    def loop_wait(self) -> float:
        return lease_refresh_interval(self.ttl)

    async def run(self) -> None:
        """Run until cancelled; on cancel, give the leader key up so another takes over at once."""
        watcher = asyncio.create_task(self._watch(), name="coordinator-watch")
        last: Outcome | None = None
        try:
            while True:
                outcome: Outcome | None = None
                started = time.perf_counter()
                try:
                    outcome = await self.cycle()
                except Exception:  # a bug must not kill the agent that hosts us
                    log.exception("coordinator cycle failed")
                if self.on_cycle is not None:
                    self.on_cycle(outcome, time.perf_counter() - started)
                if outcome is not None and outcome != last:
                    (log.warning if outcome.kind in WARNINGS else log.info)(outcome.message, outcome=outcome.kind)
                last = outcome
                ended = time.monotonic()
                await wait_event(self._changed, self.loop_wait)
                # a burst of watch events coalesces into one cycle; a long cycle is followed by a
                # gap in proportion (`core.pacing`): at 1,000 agents many status writes share one
                await asyncio.sleep(max(MIN_GAP_S, ended + cycle_gap(self.busy_s) - time.monotonic()))
                self._changed.clear()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await watcher
            if self.is_leader:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(self.store.release_leader(self.name))
            if self.lease:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(self.store.revoke_lease(self.lease))
            if self._own_cache:
                await self.cache.close()

    async def _watch(self) -> None:
        """Wake the loop on a change it acts on: the leader key (to take over) and the spec (its
        TTL) for every agent, from two single-key watches; and for the leader any cluster key
        but events/, from its cluster cache. A follower does not watch every status write."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_leader_and_spec())
            tg.create_task(self._watch_cache())

    async def _watch_leader_and_spec(self) -> None:
        keys = self.store.keys

        async def wake_on(key: str, revision: int) -> None:
            async for _ in self.store.watch_key(key, revision):
                self._changed.set()

        while True:
            try:
                rev = await self.store.current_revision()
                async with asyncio.TaskGroup() as both:  # one lost: both end, and are opened again
                    both.create_task(wake_on(keys.leader, rev + 1))
                    both.create_task(wake_on(keys.spec, rev + 1))
            except* StoreUnavailable:
                pass
            await asyncio.sleep(1.0)

    async def _watch_cache(self) -> None:
        cache = self.cache
        while True:
            if not (self.is_leader and cache.running):
                await asyncio.sleep(0.2)  # a follower: the first cycle as leader starts the cache
                continue
            seen = cache.revision
            if await cache.wait_past(seen, self.loop_wait) and cache.changed_since(seen):
                self._changed.set()

    async def _observe(self) -> Observed:
        """The cluster from the cache, at a revision that holds this agent's own last write
        (the leader decides from what it wrote, not from before it)."""
        cache = self.cache
        await cache.current(CATCH_UP_S)
        written = self.store.written_revision
        if not await cache.wait_past(written - 1, CATCH_UP_S):
            # the watch lags, or the write's revision touched no key of ours (a revoked lease
            # without keys): read everything again, at a revision past it
            log.info("cluster cache behind our own write: reading the cluster again",
                     written=written, cache=cache.revision)
            await cache.read_again(written)
        obs = cache.observed()
        self.changed = (frozenset(cache.changed_at()) if self._previous is None
                        else cache.changed_since(self._previous.revision))
        return obs

    def _step_down(self) -> None:
        self._answered_at.clear()  # what a leader saw of nodes away: the next one sees afresh
        self._away_since.clear()
        self.is_leader = False
        self.view = None
        self._previous = None

    async def cycle(self) -> Outcome:
        """One decision: follow, or lead and write what the spec asks for. etcd away is an
        outcome too (a leader steps down: it acts again only once etcd answers)."""
        try:
            return await self._cycle()
        except StoreUnavailable as exc:
            self._step_down()
            return Outcome("unavailable", f"etcd unavailable ({str(exc) or type(exc).__name__}): "
                                          "not leading until it answers")

    async def _cycle(self) -> Outcome:
        self.busy_s = 0.0
        if not self.is_leader:  # a follower reads the spec for its TTL only
            await self._follow_spec_ttl((await read_record(self.store))[0])
        held = await self._hold_leadership()
        if held == "follower":
            return Outcome("follower", "no action: another agent holds the leader key")
        if held == "expired":
            return Outcome("deposed", "our leader lease expired and another agent holds the leader key")
        if held == "taken":
            return Outcome("deposed", "the leader key was taken over while our lease lived: following")
        began = time.perf_counter()
        obs = await self._observe()
        self.busy_s = time.perf_counter() - began
        if await self._follow_spec_ttl(obs.record):
            return Outcome("stepped-down", f"released the leader key to take it again under the spec's lease TTL "
                                           f"({self.ttl} s)")
        began = time.perf_counter()
        events = await asyncio.to_thread(observed_events, self._previous, obs)  # O(processes): off the loop too
        self.busy_s += time.perf_counter() - began
        for event in events:
            await self._event(event)
        self._previous = obs
        seen, obs = obs, await self._with_unmanaged(obs)
        began = time.perf_counter()
        # off the event loop: at 1,000 nodes a decision takes a good part of a second, which
        # would hold up the agent's lease refreshes and its API
        decision = await asyncio.to_thread(decide, seen, obs, time.time(), self._known)
        took = time.perf_counter() - began
        self.busy_s += took
        if self.busy_s > SLOW_S:
            log.info("slow cycle", read_and_events_s=round(self.busy_s - took, 3), decide_s=round(took, 3))
        desired, phase = decision.desired, decision.phase
        halted = desired.rollout.halted if desired.rollout else None
        for event in rollout_halted(self._halted, halted):
            await self._event(event)
        self._halted = halted
        rollout = desired.rollout.roles if desired.rollout else ()
        self.view = LeaderView(phase, {n: n in obs.members for n in obs.assignments},
                               unmanaged=tuple(obs.record.unmanaged if obs.record else ()),
                               outdated=tuple((r.role, r.total - r.updated) for r in rollout), halted=halted)
        outcome = await self._apply(seen, decision)
        if self.view is not None and self._refused is not None:  # still leading: show why the write was refused
            self.view = replace(self.view, refused=self._refused)
        if self._events_added:  # also a crash loop's events, which change no assignment
            self._events_added = False
            await self.store.trim_events(self.events_kept)
        if held == "acquired" and outcome.kind in ("unchanged", "waiting", "wrote"):
            return Outcome("acquired", f"acquired the leader key as {self.name}; {outcome.message}")
        return outcome

    async def _with_unmanaged(self, obs: Observed) -> Observed:
        """`obs` with the record's `unmanaged` and `recently_lost` nodes as this leader finds
        them. Of the assigned nodes whose agent is away (no member key): unmanaged while an
        engine of theirs answered its readiness probe within the last `policy.node_loss_grace_s`
        (it may still serve); recently lost while none answered but this leader saw the node
        away for less than that. Neither is replaced: a replacement would hold the same DP
        ranks. Probed here (I/O), decided from in the pure core."""
        record = obs.record
        away = sorted(n for n in obs.assignments if n not in obs.members)
        for seen in (self._answered_at, self._away_since):
            for node in set(seen) - set(away):
                del seen[node]  # back (or unassigned): a later loss starts afresh
        if record is None or record.action != "start":
            return obs
        grace = node_loss_grace(record)
        now = time.monotonic()
        answers = await asyncio.gather(*(_answers(obs.assignments[n].processes) for n in away))
        for node, answered in zip(away, answers, strict=True):
            self._away_since.setdefault(node, now)
            # recorded unmanaged by a previous leader: it answered that leader lately
            if answered or (node in record.unmanaged and node not in self._answered_at):
                self._answered_at[node] = now
        unmanaged = [n for n in away if n in self._answered_at and now - self._answered_at[n] < grace]
        recently = [n for n in away if n not in unmanaged and now - self._away_since[n] < grace]
        if unmanaged == record.unmanaged and recently == record.recently_lost:
            return obs
        return replace(obs, record=record.model_copy(update={"unmanaged": unmanaged, "recently_lost": recently}))

    async def _event(self, event: ClusterEvent) -> None:
        await self.store.append_event(event.kind, event.message, **event.fields)
        self._events_added = True

    async def _follow_spec_ttl(self, record: SpecRecord | None) -> bool:
        """The spec's `policy.lease_ttl_s` sets member leases and, from the next election, ours.

        True when the TTL changed (a leader then hands its key over to take it anew).
        """
        ttl = ((record.spec if record else {}).get("policy") or {}).get("lease_ttl_s")
        if not isinstance(ttl, int) or ttl == self.ttl:
            return False
        self.ttl = ttl
        self.member_lease.ask_ttl(ttl)
        if self.is_leader:  # our lease has the old TTL: hand the key over and take it anew
            await self.store.release_leader(self.name)
            self._step_down()
        if self.lease is not None:
            await self.store.revoke_lease(self.lease)
            self.lease = None
        return True

    async def _hold_leadership(self) -> Held:
        now = time.monotonic()
        expired = False
        if self.is_leader:
            if now - self._last_refresh < self.loop_wait:
                return "kept"
            assert self.lease is not None
            if await self.store.refresh_lease(self.lease) > 0:
                # and the key itself: deleted or overwritten by hand (etcdctl, a restore), our
                # live lease alone would keep us "leading" a key nobody holds, or someone else's
                # (Patroni checks its key each cycle too). A free key is taken back at once.
                if not await self.store.acquire_leader(self.name, self.lease):
                    self._step_down()
                    return "taken"
                self._last_refresh = now
                return "kept"
            self._step_down()
            self.lease = None
            expired = True
        if self.lease is None or await self.store.refresh_lease(self.lease) == 0:
            self.lease = await self.store.grant_lease(self.ttl)
        self._last_refresh = time.monotonic()
        if await self.store.acquire_leader(self.name, self.lease):
            self.is_leader = True
            if not self._announced:
                await self._event(new_leader(self.name))
                self._announced = True
            return "acquired"
        self._announced = False  # another agent holds the key: our next hold is news again
        return "expired" if expired else "follower"

    async def _apply(self, obs: Observed, decision: Decision) -> Outcome:
        desired, phase, todo = decision.desired, decision.phase, decision.todo
        if not todo:
            if desired.missing:
                return Outcome("waiting", "no action: waiting for " + "; ".join(desired.missing))
            if obs.record is None:
                return Outcome("unchanged", "no action: no spec submitted")
            return Outcome("unchanged", f"no action: cluster {phase}")
        keys = self.store.keys
        # The spec record first (a new placement, master or group epoch): written in chunks
        # (`Store.write_as_leader`), a crash between them leaves a record that the next leader
        # plans the remaining assignments from, never assignments its record does not explain.
        models: dict[str, NodeAssignment | SpecRecord] = {keys.spec: todo.record} if todo.record is not None else {}
        models |= {keys.assignment(n): a for n, a in todo.puts.items()}
        # encoded through the cache: it keeps these models when the watch brings them back
        # rather than decode ~9 MB on this loop after a start of 1,024 nodes
        puts = {key: self.cache.encode(key, model) for key, model in models.items()}
        deletes = [keys.assignment(n) for n in todo.deletes]
        # Fenced on the leader key, and on the spec record we decided from: a stop or a
        # replacing spec submitted during this cycle must not be overwritten.
        began = time.perf_counter()
        try:
            result = await self.store.write_as_leader(self.name, puts, deletes,
                                                      unchanged={keys.spec: obs.record_revision})
        except RequestTooLarge as exc:
            self._refused = str(exc)
            return Outcome("refused", f"not written: {exc}; trying again next cycle")
        if (took := time.perf_counter() - began) > SLOW_S:
            log.info("slow leader write", keys=len(puts) + len(deletes), mib=round(sum(map(len, puts.values())) / 2**20, 1),
                     write_s=round(took, 3))
        self._refused = None
        record_written = todo.record is not None and result.written > 0  # it went first
        self.assignment_writes += result.written - int(record_written)
        partly = f" ({result.written} of {len(puts) + len(deletes)} keys were written first)" if result.written else ""
        if result.outcome == "changed":
            self._changed.set()  # decide again, at once, from a fresh read
            return Outcome("changed-concurrently", f"nothing {'more ' if partly else ''}written: the spec record "
                                                   f"changed while deciding; deciding again{partly}")
        if result.outcome == "deposed":
            self._step_down()
            return Outcome("deposed", f"nothing {'more ' if partly else ''}written: the leader key is no longer "
                                      f"ours (fenced){partly}")
        for event in write_events(obs, desired):
            await self._event(event)
        return Outcome("wrote", _what_was_written(todo))


NAMED_NODES = 16  # an outcome names this many nodes at most (a start of 1,000 nodes: one line, not 10 KB)


def _nodes(names: list[str]) -> str:
    more = len(names) - NAMED_NODES
    return ", ".join(names[:NAMED_NODES]) + (f" and {more} more" if more > 0 else "")


def _what_was_written(todo: Changes) -> str:
    parts = []
    if todo.puts:
        parts.append("wrote the assignments of " + _nodes(sorted(todo.puts)))
    if todo.deletes:
        parts.append("deleted the assignments of " + _nodes(todo.deletes))
    if todo.record is not None:
        parts.append(f"wrote the spec record (generation {todo.record.generation}, {todo.record.action})")
    return "; ".join(parts)


def node_loss_grace(record: SpecRecord) -> float:
    """`policy.node_loss_grace_s` of the recorded spec (validated on submit)."""
    value = (record.spec.get("policy") or {}).get("node_loss_grace_s", NODE_LOSS_GRACE_S)
    return float(value) if isinstance(value, int | float) else NODE_LOSS_GRACE_S


async def _answers(processes: list[ProcessSpec]) -> bool:
    """Does any engine of these answer its readiness probe (from here, the coordinator's node)?"""
    probes = [p.readiness.model_copy(update={"timeout_s": min(p.readiness.timeout_s, ANSWER_TIMEOUT_S)})
              for p in processes if p.role in ENGINE_ROLES and p.readiness is not None]
    return any(await asyncio.gather(*(probe_once(p) for p in probes)))
