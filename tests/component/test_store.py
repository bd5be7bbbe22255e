"""The store against a real etcd: typed records, leases, fenced leader writes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from pdsupervisor.core.cluster_view import SpecRecord
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.local.ports import free_port
from pdsupervisor.store.cluster import observe, observe_membership, read_record, submit_spec
from pdsupervisor.store.etcd import EtcdError, RequestTooLarge, Store, StoreUnavailable, WatchLost
from tests.cluster_helpers import cluster_spec
from tests.conftest import EtcdServer, running_etcd, until, wait_for


async def test_member_under_lease_disappears_when_lease_revoked(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        lease = await store.grant_lease(5)
        await store.register_member(NodeFacts(name="n1", ip="127.0.0.2"), lease)
        assert list((await store.members()).keys()) == ["n1"]
        assert await store.refresh_lease(lease) > 0
        await store.revoke_lease(lease)
        assert await store.members() == {}
        assert await store.refresh_lease(lease) == 0


async def test_only_leader_key_holder_can_write(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        lease_a = await store.grant_lease(5)
        lease_b = await store.grant_lease(5)
        assert await store.acquire_leader("a", lease_a)
        assert not await store.acquire_leader("b", lease_b)
        assert await store.leader() == "a"
        assignment = NodeAssignment(node="n1", processes=[ProcessSpec(name="p", role="prefill", argv=["true"])])
        key = store.keys.assignment("n1")
        assert (await store.write_as_leader("b", {key: assignment})).outcome == "deposed"
        assert await store.assignment("n1") is None
        assert (await store.write_as_leader("a", {key: assignment})).outcome == "written"
        assert (await store.assignment("n1")) == assignment
        await store.revoke_lease(lease_a)  # a loses leadership: its next write is fenced off
        assert (await store.write_as_leader("a", {}, deletes=[key])).outcome == "deposed"
        assert await store.acquire_leader("b", lease_b)
        assert (await store.write_as_leader("b", {}, deletes=[key])).outcome == "written"
        assert await store.assignment("n1") is None


async def test_watch_sees_changes_after_read_revision(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        await store.put(store.keys.assignment("before"), b"{}")
        _, rev = await store.get_prefix(store.keys.assignments)
        seen: list[tuple[str, bool]] = []

        async def consume() -> None:
            async for ev in store.watch_prefix(store.keys.assignments, rev + 1):
                seen.append((ev.key.rsplit("/", 1)[-1], ev.value is None))
                if len(seen) == 2:
                    return

        task = asyncio.create_task(consume())
        await store.put(store.keys.assignment("x"), b"{}")
        await store.delete(store.keys.assignment("x"))
        await asyncio.wait_for(task, 10)
        assert seen == [("x", False), ("x", True)]


async def test_leader_key_is_kept_under_the_same_lease_only(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        mine, other = await store.grant_lease(5), await store.grant_lease(5)
        assert await store.acquire_leader("a", mine)
        assert await store.acquire_leader("a", mine)  # ours already: resumed, not refused
        assert not await store.acquire_leader("a", other)  # same name, another incarnation's lease
        assert not await store.acquire_leader("b", other)


async def test_leader_write_is_fenced_on_what_it_was_decided_from(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        lease = await store.grant_lease(5)
        assert await store.acquire_leader("a", lease)
        await store.put(store.keys.spec, b'{"v": 1}')
        read = await store.get(store.keys.spec)
        await store.put(store.keys.spec, b'{"v": 2}')  # e.g. a stop arrives mid-cycle
        key = store.keys.assignment("n1")
        outcome = await store.write_as_leader("a", {key: b"{}"}, unchanged={store.keys.spec: read.mod_revision})
        assert outcome.outcome == "changed" and await store.get(key) is None and await store.leader() == "a"
        fresh = await store.get(store.keys.spec)
        written = await store.write_as_leader("a", {key: b"{}"}, unchanged={store.keys.spec: fresh.mod_revision})
        assert written.outcome == "written"


async def test_a_watch_from_a_compacted_revision_ends_instead_of_hanging(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        first = await store.put(store.keys.assignment("x"), b"1")
        await store.put(store.keys.assignment("x"), b"2")
        latest = await store.put(store.keys.assignment("x"), b"3")
        await store.compact(latest)

        async def consume() -> None:
            async for _ in store.watch_prefix(store.keys.assignments, first):
                pass

        with pytest.raises(WatchLost):
            await asyncio.wait_for(consume(), 5)


async def test_a_refused_endpoint_is_skipped_for_the_next_one(etcd_server, cluster_name):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    async with Store([dead, etcd_server.endpoint], cluster_name) as store:
        rev = await store.put(store.keys.spec, b'{"v": 1}')
        kv = await store.get(store.keys.spec)
        assert kv is not None and kv.value == b'{"v": 1}' and kv.mod_revision == rev
    async with Store([dead], cluster_name, timeout_s=1) as store:
        with pytest.raises(StoreUnavailable) as refused:
            await store.get(store.keys.spec)
    # the store's own error, caused by the transport's: a caller's `except StoreUnavailable`
    # cannot swallow a ConnectionError or TimeoutError that is not etcd's
    assert type(refused.value) is StoreUnavailable
    assert isinstance(refused.value.__cause__, aiohttp.ClientConnectorError)
    assert dead in str(refused.value)


async def test_an_etcd_error_names_what_etcd_said(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        rev = await store.current_revision()
        with pytest.raises(EtcdError, match="future revision"):
            await store.compact(rev + 1000)


async def test_values_and_keys_survive_the_gateway_encoding(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        raw = bytes(range(256))
        key = store.keys.assignment("nöde-ü")
        await store.put(key, raw)
        kvs, _ = await store.get_prefix(store.keys.assignments)
        assert [(kv.key, kv.value) for kv in kvs] == [(key, raw)]


async def test_an_endpoint_that_drops_connections_is_skipped_after_the_connect_timeout(etcd_server, cluster_name,
                                                                                       black_hole):
    silent = f"http://{black_hole}"
    async with Store([silent, etcd_server.endpoint], cluster_name, timeout_s=3) as store:
        await store.put(store.keys.spec, b"{}")
        assert (await store.get(store.keys.spec)).value == b"{}"


async def test_an_endpoint_that_takes_requests_but_never_answers_is_left_for_the_next(etcd_server, cluster_name):
    """A member without a quorum (or hung) accepts connections and answers nothing: that request
    fails (it may have been applied: it is not sent twice), the next goes to the next endpoint."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)  # the kernel completes handshakes; nobody ever reads
    try:
        async with Store([f"http://127.0.0.1:{mute.getsockname()[1]}", etcd_server.endpoint], cluster_name,
                         timeout_s=0.5) as store:
            with pytest.raises(StoreUnavailable, match="127.0.0.1"):
                await store.put(store.keys.spec, b"{}")
            await store.put(store.keys.spec, b'{"v": 2}')
            assert (await store.get(store.keys.spec)).value == b'{"v": 2}'
    finally:
        mute.close()


def _watch_streams_started(endpoint: str) -> float:
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("grpc_server_started_total{") and 'grpc_service="etcdserverpb.Watch"' in line)


async def test_a_quiet_watch_is_opened_again_without_losing_or_repeating_events(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        first = await store.put(store.keys.assignment("a"), b"1")
        seen: list[tuple[str, bytes | None]] = []

        async def consume() -> None:
            async for ev in store.watch_prefix(store.keys.assignments, first, idle_s=0.3):
                seen.append((ev.key.rsplit("/", 1)[-1], ev.value))

        opened = _watch_streams_started(etcd_server.endpoint)
        task = asyncio.create_task(consume())
        try:
            await asyncio.to_thread(wait_for, lambda: _watch_streams_started(etcd_server.endpoint) >= opened + 3,
                                    10, 0.1, "the quiet watch to be opened again twice")
            await store.put(store.keys.assignment("b"), b"2")
            await until(lambda: len(seen) >= 2, what="the event after the re-opens")
        finally:
            task.cancel()
        assert seen == [("a", b"1"), ("b", b"2")]


async def test_events_are_read_newest_last_and_trimmed_to_the_newest(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        for i in range(7):
            await store.append_event("t", f"e{i}")
        assert [e["message"] for e in await store.events(3)] == ["e4", "e5", "e6"]
        await store.trim_events(keep=4)
        assert [e["message"] for e in await store.events(100)] == ["e3", "e4", "e5", "e6"]
        await store.trim_events(keep=4)  # nothing in excess: nothing deleted
        assert len(await store.events(100)) == 4


# ---- one snapshot at one revision ---------------------------------------------------------

@pytest.fixture(scope="module")
def quiet_etcd(tmp_path_factory) -> Iterator[EtcdServer]:
    """An etcd only the snapshot tests write to, so its revision moves by their writes alone
    (in `etcd_server`, another test's lease expiring deletes a key at any moment)."""
    with running_etcd(tmp_path_factory.mktemp("quiet-etcd")) as server:
        yield server


async def test_an_observation_is_read_at_the_revision_of_the_last_write(quiet_etcd, cluster_name):
    async with Store([quiet_etcd.endpoint], cluster_name) as store:
        keys, lease = store.keys, await store.grant_lease(30)
        try:
            facts, status = NodeFacts(name="n1", ip="127.0.0.2", lease=lease), NodeStatus(node="n1", updated_at=1.0)
            record = SpecRecord(generation=1, spec={"cluster": cluster_name})
            await store.register_member(facts, lease)
            await store.put_status(status)
            assert await store.acquire_leader("n1", lease)
            last = await store.put(keys.spec, record.model_dump_json().encode())
            before = await observe(store)
            assert (before.revision, before.record_revision) == (last, last)
            assert (before.record, before.leader, before.members, before.statuses, before.assignments) == (
                record, "n1", {"n1": facts}, {"n1": status}, {})

            assignment = NodeAssignment(node="n1", generation=1)
            written = await store.put(keys.assignment("n1"), assignment.model_dump_json().encode())
            after = await observe(store)
            assert written == last + 1 and after.revision == written
            assert before.assignments == {} and after.assignments == {"n1": assignment}
            assert (after.record, after.record_revision, after.members) == (record, last, {"n1": facts})

            # the store's own view of it: every key and prefix asked, at that one revision
            read, revision = await store.snapshot(keys=(keys.spec, keys.leader, keys.member("n9")),
                                                  prefixes=(keys.assignments, keys.events))
            assert revision == written == await store.current_revision()
            assert [kv.mod_revision for kv in read[keys.spec]] == [last]
            assert [kv.value for kv in read[keys.leader]] == [b"n1"] and read[keys.member("n9")] == []
            assert [kv.mod_revision for kv in read[keys.assignments]] == [written] and read[keys.events] == []
        finally:
            await store.revoke_lease(lease)


async def test_an_observation_never_mixes_two_writes(quiet_etcd, cluster_name):
    """Spec, member, assignment and status change together (one txn) while the observer reads:
    each observation holds the parts of one write, never parts of two."""
    async with Store([quiet_etcd.endpoint], cluster_name) as store:
        keys, lease, rounds = store.keys, await store.grant_lease(30), 40
        assert await store.acquire_leader("w", lease)

        async def writer() -> None:
            for g in range(1, rounds + 1):
                assert (await store.write_as_leader("w", {
                    keys.spec: SpecRecord(generation=g, spec={}),
                    keys.member("n1"): NodeFacts(name="n1", ip="127.0.0.2", registered_at=g),
                    keys.assignment("n1"): NodeAssignment(node="n1", generation=g),
                    keys.node_status("n1"): NodeStatus(node="n1", updated_at=g),
                })).outcome == "written"

        task = asyncio.create_task(writer())
        seen = []
        try:
            while not task.done():
                seen.append(await observe(store))
            await task
        finally:
            task.cancel()
            await store.revoke_lease(lease)
        for obs in seen:
            member, assignment, status = (obs.members.get("n1"), obs.assignments.get("n1"), obs.statuses.get("n1"))
            parts = (obs.record.generation if obs.record else 0, member.registered_at if member else 0,
                     assignment.generation if assignment else 0, status.updated_at if status else 0)
            assert len(set(parts)) == 1, f"parts of different writes at revision {obs.revision}: {parts}"
            if obs.record is not None:  # the writer's txn is the last write of the revision read
                assert obs.revision == obs.record_revision and obs.leader == "w"
        assert any(0 < (o.record.generation if o.record else 0) < rounds for o in seen)  # read while it wrote


async def test_a_watch_from_after_the_snapshot_sees_the_next_write(quiet_etcd, cluster_name):
    async with Store([quiet_etcd.endpoint], cluster_name) as store:
        keys = store.keys
        await store.put(keys.member("n1"), NodeFacts(name="n1", ip="127.0.0.2").model_dump_json().encode())
        seen = await observe_membership(store)
        assert list(seen.members) == ["n1"] and seen.statuses == {} and seen.assignments == {}
        revision = seen.revision
        # written after the read, before any watch: the watch from revision + 1 must still see it
        written = await store.put(keys.node_status("n1"), NodeStatus(node="n1", updated_at=1.0).model_dump_json().encode())
        events = store.watch_prefix(keys.root, revision + 1)
        try:
            first = await asyncio.wait_for(anext(events), 10)
        finally:
            await events.aclose()
        # not the member write the snapshot already holds, but the one right after it
        assert (first.key, first.revision) == (keys.node_status("n1"), written) and written == revision + 1


async def test_the_store_tells_its_observer_of_each_request(etcd_server, cluster_name):
    seen: list[tuple[str, bool]] = []

    def observe(path: str, seconds: float, answered: bool) -> None:
        assert 0 <= seconds < 5
        seen.append((path, answered))

    async with Store([etcd_server.endpoint], cluster_name, on_request=observe) as store:
        rev = await store.put(store.keys.spec, b"{}")
        assert seen == [("/v3/kv/put", True)]
        with pytest.raises(EtcdError):  # an error answer is an answer
            await store.compact(rev + 1000)
        assert seen[-1] == ("/v3/kv/compaction", True)
        seen.clear()
        events = store.watch_prefix(store.keys.root, rev)  # a stream, not a request: not observed
        assert (await anext(events)).key == store.keys.spec
        await events.aclose()
        assert seen == []
    away = Store([f"127.0.0.1:{free_port()}"], cluster_name, timeout_s=1, on_request=observe)
    async with away:
        with pytest.raises(StoreUnavailable):
            await away.get("x")
    assert seen == [("/v3/kv/range", False)]


async def test_a_replace_keeps_the_group_epoch(etcd_server, cluster_name):
    """Both are in the engines' specs (or decide about them): a replace of the very same spec
    must not restart the decode group nor forget a node the coordinator holds back."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        spec = validate_spec(cluster_spec(cluster_name, etcd_server.endpoint, decode_nodes=["n2"]))
        assert (await submit_spec(store, spec)).status == 202
        record, _ = await read_record(store)
        carried = {"group_epoch": 3, "group_since": 5.0, "group_restarts": 2, "group_reason": "rank 1 failed",
                   "unmanaged": ["n2"], "recently_lost": ["n3"]}
        await store.put(store.keys.spec, record.model_copy(update=carried).model_dump_json().encode())
        assert (await submit_spec(store, spec, replace=True)).status == 202
        replaced, _ = await read_record(store)
        assert replaced.generation == record.generation + 1
        assert {k: getattr(replaced, k) for k in carried} == carried


def _assignments(store: Store, count: int) -> dict[str, NodeAssignment]:
    return {store.keys.assignment(f"n{i:03d}"): NodeAssignment(node=f"n{i:03d}", processes=[
        ProcessSpec(name="decode-0", role="decode", argv=["serve", "--port", "8200"])]) for i in range(count)}


def _after_first_txn(store: Store, monkeypatch, meanwhile) -> list[int]:
    """Run `meanwhile()` once, right after the first txn etcd applies; the op counts of the
    txns it applied."""
    txn, sizes = store._txn, []

    async def spy(compare, success, failure=()):
        out = await txn(compare, success, failure)
        if out.get("succeeded"):
            sizes.append(len(success))
            if len(sizes) == 1:
                await meanwhile()
        return out

    monkeypatch.setattr(store, "_txn", spy)
    return sizes


@contextlib.asynccontextmanager
async def _leading(etcd_server, cluster_name) -> AsyncIterator[tuple[Store, int]]:
    """A store whose client holds the leader key as "a" under a lease revoked at the end."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        lease = await store.grant_lease(10)
        try:
            assert await store.acquire_leader("a", lease)
            yield store, lease
        finally:
            await store.revoke_lease(lease)


async def test_a_large_leader_write_goes_in_fenced_chunks(etcd_server, cluster_name, monkeypatch):
    """300 assignments (over etcd's 128 ops per txn) land in chunks of at most 64, all of them;
    the spec record, written in the first chunk, fences the later ones on its own write."""
    async with _leading(etcd_server, cluster_name) as (store, _):
        read_rev = await store.put(store.keys.spec, SpecRecord(generation=1, spec={}).model_dump_json().encode())

        async def nothing() -> None:
            pass

        sizes = _after_first_txn(store, monkeypatch, nothing)
        puts = {store.keys.spec: SpecRecord(generation=2, spec={}), **_assignments(store, 300)}
        result = await store.write_as_leader("a", puts, unchanged={store.keys.spec: read_rev})
        assert (result.outcome, result.written, result.txns) == ("written", 301, 5)
        assert sizes[0] == 64 and sorted(sizes[1:]) == [45, 64, 64, 64]  # the record's chunk first, alone
        assert len(await store.assignments()) == 300
        assert (await read_record(store))[0].generation == 2
        # bytes cut too: ~100 bytes a key and value, 1000 bytes a txn
        result = await store.write_as_leader("a", {}, deletes=list(_assignments(store, 300)), max_bytes=1000)
        assert result.outcome == "written" and result.txns > 5 and await store.assignments() == {}


async def test_a_spec_change_between_chunks_stops_the_write(etcd_server, cluster_name, monkeypatch):
    """A stop submitted after the first chunk: the rest is "changed", not written."""
    async with _leading(etcd_server, cluster_name) as (store, _):
        read_rev = await store.put(store.keys.spec, SpecRecord(generation=1, spec={}).model_dump_json().encode())

        async def stop() -> None:
            record = SpecRecord(generation=2, action="stop", spec={})
            await store.put(store.keys.spec, record.model_dump_json().encode())

        sizes = _after_first_txn(store, monkeypatch, stop)
        puts = {store.keys.spec: SpecRecord(generation=2, spec={}), **_assignments(store, 300)}
        result = await store.write_as_leader("a", puts, unchanged={store.keys.spec: read_rev})
        assert (result.outcome, result.written, result.txns) == ("changed", 64, 1)
        assert sizes == [64]  # the second chunk was refused by its compare
        assert len(await store.assignments()) == 63
        assert (await read_record(store))[0].action == "stop"


async def test_a_leader_deposed_between_chunks_writes_nothing_more(etcd_server, cluster_name, monkeypatch):
    async with _leading(etcd_server, cluster_name) as (store, lease):

        async def deposed() -> None:
            await store.revoke_lease(lease)  # the leader key goes with its lease
            assert await store.acquire_leader("b", await store.grant_lease(10))

        _after_first_txn(store, monkeypatch, deposed)
        result = await store.write_as_leader("a", _assignments(store, 200), parallel=1)
        assert (result.outcome, result.written, result.txns) == ("deposed", 64, 1)
        assert len(await store.assignments()) == 64 and await store.leader() == "b"


async def test_a_write_over_etcds_request_limit_is_refused_as_too_large(etcd_server, cluster_name):
    """Not "etcd unavailable": the same write will be refused again, and the error says what."""
    async with _leading(etcd_server, cluster_name) as (store, _):
        key = store.keys.assignment("huge")
        with pytest.raises(RequestTooLarge, match="etcd refused a write of 1 keys .* the largest .*huge"):
            await store.write_as_leader("a", {key: b"x" * (2 * 1024 * 1024)})
        assert await store.get(key) is None
