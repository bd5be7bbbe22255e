"""The coordinator's decisions, one `cycle()` at a time, against a real etcd.

No loop runs and nothing sleeps: each test writes members, status and the spec record with
the store (as agents and the REST API would), runs a cycle, and checks the outcome it
returns and what it wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from agent.coordinator import Coordinator, LeaderView, Outcome
from agent.lease import LeaseState
from pdsupervisor.aio.serve import start_site
from pdsupervisor.core.cluster_view import cluster_document, desired_state
from pdsupervisor.core.models import NodeFacts, NodeStatus, ProcessState, ProcessStatus
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.store.cluster import observe, read_record, request_stop, submit_spec
from pdsupervisor.store.etcd import RequestTooLarge, Store, StoreUnavailable
from tests.cluster_helpers import cluster_spec

TTL = 5  # the coordinators' and the spec's, so that no cycle steps down to change it
PIDS = {"mooncake-master": 100, "prefill-0": 200, "decode-0": 300, "decode-1": 301, "proxy": 400}


class Cluster:
    """One test's cluster in etcd: members, what their agents report, coordinators."""

    def __init__(self, store: Store, etcd: str) -> None:
        self.store, self.etcd = store, etcd
        self.member_lease = 0
        self.coordinators: list[Coordinator] = []

    def coordinator(self, name: str = "a", ttl: int = TTL, store: Store | None = None) -> Coordinator:
        coord = Coordinator(store or self.store, name, LeaseState(ttl))
        self.coordinators.append(coord)
        return coord

    async def join(self, *names: str) -> None:
        """Register members n1 (127.0.0.1), n2 (127.0.0.2), ... under one lease."""
        if not self.member_lease:
            self.member_lease = await self.store.grant_lease(30)
        for name in names:
            facts = NodeFacts(name=name, ip=f"127.0.0.{name[1:]}", lease=self.member_lease)
            await self.store.register_member(facts, self.member_lease)

    async def submit(self, decode_nodes: list[str], ttl: int = TTL) -> None:
        doc = cluster_spec(self.store.cluster, self.etcd, decode_nodes=decode_nodes, ttl=ttl)
        doc["mooncake"]["enabled"] = True  # the master stage, whether or not mooncake_master is installed
        assert (await submit_spec(self.store, validate_spec(doc))).status == 202

    async def report(self) -> None:
        """Every member's agent runs exactly its assignment now, every process ready."""
        assignments = await self.store.assignments()
        for node in await self.store.members():
            procs = assignments[node].processes if node in assignments else []
            await self.store.put_status(NodeStatus(node=node, updated_at=1.0, lease=self.member_lease, processes=[
                ProcessStatus(name=p.name, role=p.role, state=ProcessState.ready, pid=PIDS[p.name],
                              spec_hash=p.spec_hash()) for p in procs]))

    async def assigned(self) -> dict[str, list[str]]:
        return {n: [p.name for p in a.processes] for n, a in (await self.store.assignments()).items()}

    async def events(self) -> list[str]:
        return [e["message"] for e in await self.store.events(limit=100)]

    async def close(self) -> None:
        for lease in [self.member_lease] + [c.lease for c in self.coordinators]:
            if lease:
                await self.store.revoke_lease(lease)


@pytest.fixture
async def cluster(etcd_server, cluster_name) -> AsyncIterator[Cluster]:
    async with Store([etcd_server.endpoint], cluster_name) as store:
        c = Cluster(store, etcd_server.endpoint)
        try:
            yield c
        finally:
            await c.close()


async def _started(c: Cluster, coord: Coordinator) -> None:
    """n1 and n2 run the spec, every stage assigned and ready."""
    await c.join("n1", "n2")
    await c.submit(decode_nodes=["n2"])
    for _ in range(3):  # master, engines, proxy: one stage per write once the last is ready
        assert (await coord.cycle()).kind == "wrote"
        await c.report()
    assert await coord.cycle() == Outcome("unchanged", "no action: cluster ready")


async def test_a_follower_while_another_holds_the_key(cluster):
    assert (await cluster.coordinator("b").cycle()).kind == "acquired"
    a = cluster.coordinator("a")
    assert await a.cycle() == Outcome("follower", "no action: another agent holds the leader key")
    assert not a.is_leader and await cluster.store.leader() == "b"


async def test_acquires_a_free_key_then_leads(cluster):
    a = cluster.coordinator("a")
    assert await a.cycle() == Outcome("acquired", "acquired the leader key as a; no action: no spec submitted")
    assert a.is_leader and await cluster.store.leader() == "a"
    assert await cluster.events() == ["a is the coordinator"]
    assert await a.cycle() == Outcome("unchanged", "no action: no spec submitted")


async def test_writes_each_start_stage_once_the_last_is_ready(cluster):
    a = cluster.coordinator("a")
    await a.cycle()
    await cluster.join("n1", "n2")
    await cluster.submit(decode_nodes=["n2"])
    assert await a.cycle() == Outcome("wrote", "wrote the assignments of n1; wrote the spec record (generation 1, start)")
    assert await cluster.assigned() == {"n1": ["mooncake-master"]}
    assert await a.cycle() == Outcome("unchanged", "no action: cluster starting")  # the master is not ready
    await cluster.report()
    outcome = await a.cycle()
    assert outcome.kind == "wrote" and "wrote the assignments of n1, n2;" in outcome.message
    assert await cluster.assigned() == {"n1": ["mooncake-master", "prefill-0"], "n2": ["decode-0", "decode-1"]}
    assert (await read_record(cluster.store))[0].master_pid == PIDS["mooncake-master"]
    assert (await a.cycle()).kind == "unchanged"
    await cluster.report()
    # the proxy, and the record: the decode DP group formed (every rank ready)
    assert await a.cycle() == Outcome("wrote", "wrote the assignments of n1; wrote the spec record (generation 1, start)")
    assert (await read_record(cluster.store))[0].group_ready
    assert (await cluster.assigned())["n1"] == ["mooncake-master", "prefill-0", "proxy"]
    await cluster.report()
    assert await a.cycle() == Outcome("unchanged", "no action: cluster ready")
    assert (await cluster.events())[-4:] == ["mooncake-master assigned", "decode assigned", "prefill assigned",
                                             "proxy released: every engine is ready"]


async def test_waits_for_a_missing_member_and_names_it(cluster):
    a = cluster.coordinator("a")
    await a.cycle()
    await cluster.join("n1")
    await cluster.submit(decode_nodes=["n2"])
    assert await a.cycle() == Outcome("waiting", "no action: waiting for decode.node_names: node n2 is not registered")
    assert await cluster.assigned() == {}
    await cluster.join("n2")
    assert (await a.cycle()).kind == "wrote"
    assert await cluster.events() == ["a is the coordinator", "generation 1 submitted", "n1 joined", "n2 joined",
                                      "mooncake-master assigned"]


async def test_deposed_when_the_leader_key_is_taken_away(cluster):
    a, b = cluster.coordinator("a"), cluster.coordinator("b")
    await a.cycle()
    await cluster.store.delete(cluster.store.keys.leader)  # by hand, while a's lease lives on
    assert (await b.cycle()).kind == "acquired"
    await cluster.join("n1", "n2")
    await cluster.submit(decode_nodes=["n2"])
    assert await a.cycle() == Outcome("deposed", "nothing written: the leader key is no longer ours (fenced)")
    assert not a.is_leader and await cluster.assigned() == {}
    assert (await a.cycle()).kind == "follower"
    assert (await b.cycle()).kind == "wrote"


async def test_deposed_when_its_lease_expired_and_another_took_the_key(cluster):
    a = cluster.coordinator("a", ttl=1)
    await a.cycle()
    await cluster.store.revoke_lease(a.lease)  # as an etcd outage past the TTL would: the key goes with it
    assert (await cluster.coordinator("b").cycle()).kind == "acquired"
    await asyncio.sleep(a.loop_wait)  # the scenario itself: a's next lease refresh is due
    assert await a.cycle() == Outcome("deposed", "our leader lease expired and another agent holds the leader key")
    assert not a.is_leader and await cluster.store.leader() == "b"


async def test_a_leader_whose_key_was_deleted_takes_it_back(cluster):
    """Deleted by hand while the leader's lease lives: with no write to make, a leader that
    checked only its lease would lead a key nobody holds (every former leader alike)."""
    a = cluster.coordinator("a")
    await a.cycle()
    await cluster.store.delete(cluster.store.keys.leader)
    a._last_refresh -= a.loop_wait  # its next refresh is due
    assert await a.cycle() == Outcome("unchanged", "no action: no spec submitted")
    assert a.is_leader and await cluster.store.leader() == "a"


async def test_a_leader_whose_key_was_taken_over_follows(cluster):
    """Overwritten by hand (etcdctl, a compromised writer) while the leader's lease lives: it
    steps down at its next refresh, not only at its next write, and leads again once free."""
    a = cluster.coordinator("a")
    await a.cycle()
    other = await cluster.store.grant_lease(30)
    await cluster.store.put(cluster.store.keys.leader, b"intruder", other)
    a._last_refresh -= a.loop_wait
    assert await a.cycle() == Outcome("deposed", "the leader key was taken over while our lease lived: following")
    assert not a.is_leader and await cluster.store.leader() == "intruder"
    assert (await a.cycle()).kind == "follower"
    await cluster.store.revoke_lease(other)
    assert (await a.cycle()).kind == "acquired" and await cluster.store.leader() == "a"


async def test_a_stop_during_a_cycle_is_not_overwritten(cluster, monkeypatch):
    store = cluster.store
    coord = cluster.coordinator("a")
    assert (await coord.cycle()).kind == "acquired"
    await cluster.join("n1", "n2")
    await cluster.submit(decode_nodes=["n2"])
    obs = await observe(store)
    desired = desired_state(obs)
    assert desired.record is not None and desired.record != obs.record  # it wants to write the record
    write = store.write_as_leader

    async def stop_meanwhile(*args, **kwargs):
        monkeypatch.setattr(store, "write_as_leader", write)
        assert (await request_stop(store)).status == 202  # the user stops while the leader decides
        return await write(*args, **kwargs)

    monkeypatch.setattr(store, "write_as_leader", stop_meanwhile)
    outcome = await coord.cycle()
    assert outcome == Outcome("changed-concurrently",
                              "nothing written: the spec record changed while deciding; deciding again")
    record, _ = await read_record(store)
    assert record is not None and record.action == "stop"
    assert await store.assignments() == {}  # nothing from the stale decision was written
    assert coord.is_leader
    assert await coord.cycle() == Outcome("unchanged", "no action: cluster stopped")  # decided from the stop


async def test_a_write_too_large_is_told(cluster, monkeypatch):
    """Not "etcd unavailable ... not leading": the leader keeps its key, says what was refused
    (its outcome, its view) and tries again next cycle."""
    store = cluster.store
    coord = cluster.coordinator("a")
    assert (await coord.cycle()).kind == "acquired"
    await cluster.join("n1", "n2")
    await cluster.submit(decode_nodes=["n2"])
    write = store.write_as_leader

    async def refused(*args, **kwargs):
        raise RequestTooLarge("etcd refused a write of 3 keys (2000000 bytes, the largest x): request is too large")

    monkeypatch.setattr(store, "write_as_leader", refused)
    outcome = await coord.cycle()
    assert outcome.kind == "refused" and "request is too large" in outcome.message
    assert coord.is_leader and coord.view is not None and "request is too large" in (coord.view.refused or "")
    assert await store.leader() == "a" and await store.assignments() == {}
    monkeypatch.setattr(store, "write_as_leader", write)
    assert (await coord.cycle()).kind == "wrote"
    assert coord.view is not None and coord.view.refused is None


async def test_a_crash_between_chunks_converges(cluster, monkeypatch):
    """The spec record goes first; a leader gone after it (before the assignments) leaves a
    record the next leader decides the same assignments from, and writes them."""
    store = cluster.store
    a = cluster.coordinator("a")
    assert (await a.cycle()).kind == "acquired"
    await cluster.join("n1", "n2")
    await cluster.submit(decode_nodes=["n2"])
    assert (await a.cycle()).kind == "wrote" and await cluster.assigned() == {"n1": ["mooncake-master"]}
    await cluster.report()  # the master is ready: the record takes its pid, the engines are assigned
    write, chunk = store.write_as_leader, store._leader_txn
    written: list[list[str]] = []

    async def one_key_a_txn(*args, **kwargs):
        return await write(*args, **{**kwargs, "max_ops": 1})

    async def dies_after_the_first(name, keys, fences):
        if written:
            raise StoreUnavailable("the leader's host went away")
        written.append([k for k, _ in keys])
        return await chunk(name, keys, fences)

    monkeypatch.setattr(store, "write_as_leader", one_key_a_txn)
    monkeypatch.setattr(store, "_leader_txn", dies_after_the_first)
    assert (await a.cycle()).kind == "unavailable"
    monkeypatch.undo()
    assert written == [[store.keys.spec]]
    record, _ = await read_record(store)
    assert record is not None and record.master_pid == PIDS["mooncake-master"] and record.master_epoch == 0
    assert await cluster.assigned() == {"n1": ["mooncake-master"]}  # none of the engines yet
    await store.revoke_lease(a.lease)  # a is gone: its leader key with its lease
    b = cluster.coordinator("b")
    outcome = await b.cycle()
    assert outcome.kind == "acquired" and "wrote the assignments of n1, n2" in outcome.message
    assert await cluster.assigned() == {"n1": ["mooncake-master", "prefill-0"], "n2": ["decode-0", "decode-1"]}
    assert (await read_record(store))[0] == record  # decided from it: nothing to change in it


async def test_a_stop_removes_one_stage_at_a_time(cluster):
    a = cluster.coordinator("a")
    await a.cycle()
    await _started(cluster, a)
    assert (await request_stop(cluster.store)).status == 202
    assert await a.cycle() == Outcome("wrote", "wrote the assignments of n1")
    assert await cluster.assigned() == {"n1": ["mooncake-master", "prefill-0"], "n2": ["decode-0", "decode-1"]}
    # the proxy still runs: the engines stay until its agent reports it gone
    assert await a.cycle() == Outcome("unchanged", "no action: cluster stopping")
    await cluster.report()
    assert await a.cycle() == Outcome("wrote", "wrote the assignments of n1; deleted the assignments of n2")
    assert await cluster.assigned() == {"n1": ["mooncake-master"]}
    assert (await a.cycle()).kind == "unchanged"
    await cluster.report()
    assert await a.cycle() == Outcome("wrote", "deleted the assignments of n1")
    assert await cluster.assigned() == {}
    await cluster.report()
    assert await a.cycle() == Outcome("unchanged", "no action: cluster stopped")
    assert (await cluster.events())[-4:] == ["proxy removed", "decode removed", "prefill removed",
                                             "mooncake-master removed"]


async def test_a_new_spec_ttl_takes_the_key_anew(cluster):
    a = cluster.coordinator("a")
    await a.cycle()
    await cluster.join("n1", "n2")
    await cluster.submit(decode_nodes=["n2"], ttl=7)
    assert await a.cycle() == Outcome(
        "stepped-down", "released the leader key to take it again under the spec's lease TTL (7 s)")
    assert a.member_lease.ttl == 7 and a.member_lease.ttl_asked.is_set()  # registration moves the member lease
    assert await cluster.store.leader() is None
    assert (await a.cycle()).kind == "acquired"
    assert await cluster.store.lease_granted_ttl(a.lease) == 7
    # taking its own key back under the new TTL is no news: one `leader` event, not two
    assert [m for m in await cluster.events() if m.endswith("is the coordinator")] == ["a is the coordinator"]


async def test_each_change_of_hands_is_one_event(cluster):
    a, b = cluster.coordinator("a"), cluster.coordinator("b")
    assert (await a.cycle()).kind == "acquired"
    assert (await b.cycle()).kind == "follower"
    await cluster.store.release_leader("a")  # a hands the key over, as for a new lease TTL...
    a._step_down()
    assert (await b.cycle()).kind == "acquired"  # ...but b takes it first
    assert (await a.cycle()).kind == "follower"
    await cluster.store.release_leader("b")
    assert (await a.cycle()).kind == "acquired"  # a saw b hold it: a's new hold is news
    assert await cluster.events() == ["a is the coordinator", "b is the coordinator", "a is the coordinator"]


async def test_a_failed_cycle_does_not_wedge_leadership(etcd_server, cluster):
    # short enough that the paused cycle fails fast, long enough for a loaded machine
    async with Store([etcd_server.endpoint], cluster.store.cluster, timeout_s=2.0) as impatient:
        coord = cluster.coordinator("a", store=impatient)
        await coord.cycle()
        assert coord.is_leader and await cluster.store.leader() == "a"
        coord._last_refresh -= coord.loop_wait  # its lease refresh is due: this cycle calls etcd
        etcd_server.pause()
        try:
            outcome = await coord.cycle()  # an etcd call times out
        finally:
            etcd_server.resume()
        assert outcome.kind == "unavailable" and not coord.is_leader
        assert (await coord.cycle()).kind == "acquired"
        assert coord.is_leader  # took its own key back instead of waiting on itself forever
        assert await cluster.events() == ["a is the coordinator"]  # its own key again: no second event
        other = cluster.coordinator("b")
        assert (await other.cycle()).kind == "follower"
        assert not other.is_leader and await cluster.store.leader() == "a"


async def test_events_are_trimmed_by_a_cycle_that_writes_no_assignment(cluster):
    """A crash loop adds events every backoff while no assignment changes: the log is trimmed anyway."""
    store = cluster.store
    for i in range(6):
        await store.append_event("process", f"restart {i}")
    coord = Coordinator(store, "a", LeaseState(TTL), events_kept=3)
    cluster.coordinators.append(coord)
    await coord.cycle()  # no spec: nothing to assign, one `leader` event added
    events = await store.events(limit=100)
    assert [e["kind"] for e in events] == ["process", "process", "leader"]


async def test_the_leader_view_and_writes_for_metrics(cluster):
    a = cluster.coordinator("a")
    await a.cycle()
    assert a.view == LeaderView("stopped", {}) and a.assignment_writes == 0
    await _started(cluster, a)
    assert a.view == LeaderView("ready", {"n1": True, "n2": True}, outdated=(("prefill", 0), ("decode", 0)))
    assert a.assignment_writes == 4  # n1 (master), n1 and n2 (engines), n1 (proxy)
    follower = cluster.coordinator("b")
    assert (await follower.cycle()).kind == "follower" and follower.view is None
    await cluster.store.revoke_lease(cluster.member_lease)  # both nodes lost
    cluster.member_lease = 0
    await a.cycle()
    assert a.view == LeaderView("degraded", {"n1": False, "n2": False})  # no plan: no rollout
    await cluster.store.delete(cluster.store.keys.leader)  # by hand: a's next write is fenced
    assert (await follower.cycle()).kind == "acquired"
    assert (await request_stop(cluster.store)).status == 202  # a's next cycle wants to write, and is deposed
    assert (await a.cycle()).kind == "deposed"
    assert a.view is None and not a.is_leader


async def test_an_unmanaged_node_is_not_replaced(cluster):
    """Under `replace`: n2's agent is away (its lease revoked) but its decode engine answers
    the coordinator's probe, so it is `unmanaged`, not replaced; once nothing answers for
    `node_loss_grace_s`, the spare n3 takes its place."""
    a = cluster.coordinator("a")
    await a.cycle()
    await cluster.join("n1", "n3")
    n2_lease = await cluster.store.grant_lease(30)
    await cluster.store.register_member(NodeFacts(name="n2", ip="127.0.0.2", lease=n2_lease), n2_lease)
    doc = cluster_spec(cluster.store.cluster, cluster.etcd, decode_nodes=["n2"], spare=["n3"], ttl=TTL)
    doc["mooncake"]["enabled"] = False
    doc["policy"]["node_loss_grace_s"] = 0.5
    assert (await submit_spec(cluster.store, validate_spec(doc))).status == 202
    for _ in range(3):
        await a.cycle()
        for node, lease in (("n1", cluster.member_lease), ("n2", n2_lease)):
            procs = (await cluster.store.assignments()).get(node)
            await cluster.store.put_status(NodeStatus(node=node, updated_at=1.0, lease=lease, processes=[
                ProcessStatus(name=p.name, role=p.role, state=ProcessState.ready, pid=PIDS[p.name],
                              spec_hash=p.spec_hash()) for p in (procs.processes if procs else [])]))
    assert "decode-0" in (await cluster.assigned())["n2"]
    decode = next(p for p in (await cluster.store.assignments())["n2"].processes if p.name == "decode-0")
    app = web.Application()
    app.router.add_get("/health", _ok)
    runner = await start_site(app, decode.host, decode.port)  # decode-0 of n2, alive
    try:
        await cluster.store.revoke_lease(n2_lease)  # its agent is gone
        await a.cycle()
        assert (await read_record(cluster.store))[0].unmanaged == ["n2"]
        assert set(await cluster.assigned()) == {"n1", "n2"}  # not replaced
        obs = await observe(cluster.store)
        assert any("n2 unmanaged" in m for m in await cluster.events())
        rows = cluster_document(obs, now=0.0).processes
        assert {r.state for r in rows if r.node == "n2"} == {"unmanaged"}
        assert next(r.pid for r in rows if r.node == "n2" and r.name == "decode-0") == PIDS["decode-0"]
    finally:
        await runner.cleanup()  # the engine is gone too now
    record = await read_record(cluster.store)
    deadline = asyncio.get_running_loop().time() + 10
    while "n3" not in await cluster.assigned():
        assert asyncio.get_running_loop().time() < deadline, await cluster.events()
        await a.cycle()  # probes fail: replaced once the grace has passed since the last answer
        await asyncio.sleep(0.1)
    assert "n2" not in await cluster.assigned()
    assert (await read_record(cluster.store))[0].unmanaged == [] and record[0].unmanaged == ["n2"]
    assert any("n2 lost: none of its engines answered" in m for m in await cluster.events())


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def test_an_outcome_names_a_few_nodes_and_counts_the_rest():
    from agent.coordinator import NAMED_NODES, _what_was_written
    from pdsupervisor.core.cluster_view import Changes
    from pdsupervisor.core.models import NodeAssignment

    puts = {f"n{i:04d}": NodeAssignment(node=f"n{i:04d}") for i in range(1000)}
    said = _what_was_written(Changes(puts=puts, deletes=["gone"]))
    assert said.startswith("wrote the assignments of n0000, n0001, ")
    assert f"n{NAMED_NODES - 1:04d} and {1000 - NAMED_NODES} more; deleted the assignments of gone" in said
