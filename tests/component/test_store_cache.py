"""The watch-fed cluster cache against a real etcd: paged first read, events applied, resync."""

from __future__ import annotations

import asyncio

import pytest

from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec
from pdsupervisor.core.observed import SpecRecord
from pdsupervisor.store.cache import CacheNotReady, ClusterCache
from pdsupervisor.store.cluster import observe, observe_membership
from pdsupervisor.store.etcd import Store
from tests.conftest import running_etcd, until

SPEC = SpecRecord(generation=1, spec={"cluster": "x"})


def _assignment(node: str, n: int = 2) -> NodeAssignment:
    return NodeAssignment(node=node, processes=[
        ProcessSpec(name=f"p{i}", role="decode", argv=["true"], env={"PAD": "x" * 200}) for i in range(n)])


async def _fill(store: Store, nodes: int) -> int:
    """Members under a lease, statuses, assignments, the spec and the leader key; the lease."""
    lease = await store.grant_lease(60)
    await store.put(store.keys.spec, SPEC.model_dump_json().encode())
    await store.put(store.keys.leader, b"coord", lease)
    for i in range(nodes):
        name = f"n{i:03d}"
        await store.register_member(NodeFacts(name=name, ip="127.0.0.2", lease=lease), lease)
        await store.put_status(NodeStatus(node=name, lease=lease, updated_at=1.0))
        await store.put(store.keys.assignment(name), _assignment(name).model_dump_json().encode())
    await store.append_event("x", "not cached")
    return lease


async def test_the_paged_first_read_equals_one_snapshot(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        await _fill(store, 30)
        ranges: list[str] = []
        store.on_request = lambda path, _s, _ok: ranges.append(path)
        cache = ClusterCache(store, page_size=7)
        try:
            await cache.ensure()
            # 3 * 30 keys + spec + leader at 7 a page: many pages, not one answer of all
            assert ranges.count("/v3/kv/range") >= 13
            store.on_request = None
            snap = await observe(store)
            got = cache.observed()
            assert got.revision == snap.revision
            assert got == snap
            member = await observe_membership(store)
            assert cache.membership() == member
        finally:
            await cache.close()


async def test_a_paged_read_reads_big_values_a_page_at_a_time_at_one_revision(etcd_server, cluster_name):
    """40 values of 80 KiB (4.3 MB as the gateway's base64): four answers of 10; read again at
    that revision after a write, the pages still show the keys as they were."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        prefix = store.keys.assignments
        for i in range(40):
            await store.put(f"{prefix}n{i:02d}", b"y" * 80_000)
        ranges: list[str] = []
        store.on_request = lambda path, _s, _ok: ranges.append(path)
        kvs, revision = await store.get_prefix_paged(prefix, page_size=10)
        store.on_request = None
        assert ranges == ["/v3/kv/range"] * 4
        assert [kv.key for kv in kvs] == [f"{prefix}n{i:02d}" for i in range(40)]
        assert all(kv.value == b"y" * 80_000 for kv in kvs) and revision == await store.current_revision()
        await store.put(f"{prefix}n35", b"changed")
        await store.delete(f"{prefix}n00")
        again, at = await store.get_prefix_paged(prefix, revision=revision, page_size=10)
        assert at == revision and again == kvs
        now, _ = await store.get_prefix_paged(prefix, page_size=10)
        assert len(now) == 39 and now[34].value == b"changed"
        with pytest.raises(ValueError, match="page_size"):
            await store.get_prefix_paged(prefix, page_size=0)


async def test_puts_deletes_and_an_expired_lease_are_applied(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        cache = ClusterCache(store)
        try:
            await cache.ensure()
            assert cache.observed().record is None and cache.changed_since(cache.revision) == frozenset()
            seen = cache.revision
            short = await store.grant_lease(2)  # never refreshed: expires
            await store.register_member(NodeFacts(name="n1", ip="127.0.0.2", lease=short), short)
            await store.put_status(NodeStatus(node="n1", lease=short, updated_at=1.0))
            assert await cache.wait_past(seen, 5)
            await until(lambda: "n1" in cache.statuses and "n1" in cache.members, 5, what="n1 in the cache")
            assert cache.changed_since(seen) == {"members", "status"}
            seen = cache.revision
            await store.put_status(NodeStatus(node="n1", lease=short, updated_at=2.0))
            await until(lambda: cache.statuses["n1"].updated_at == 2.0, 5, what="the new status")
            assert cache.changed_since(seen) == {"status"}  # a status only: nothing to plan
            await store.put(store.keys.spec, SPEC.model_dump_json().encode())
            await until(lambda: cache.observed().record == SPEC, 5, what="the spec record")
            assert cache.observed().record_revision == (await store.get(store.keys.spec)).mod_revision
            await store.delete(store.keys.node_status("n1"))
            await until(lambda: "n1" not in cache.observed().statuses, 5, what="the status deleted")
            await until(lambda: "n1" not in cache.observed().members, 10, what="the member key to expire")
            assert cache.resyncs == 0 and cache.synced
        finally:
            await cache.close()


async def test_the_cache_sees_its_own_clients_last_write(etcd_server, cluster_name):
    """`Store.written_revision` is reached by the cache: a leader reads at least its own write."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        cache = ClusterCache(store)
        try:
            await cache.ensure()
            lease = await store.grant_lease(10)
            assert await store.acquire_leader("a", lease)
            assert (await store.write_as_leader("a", {store.keys.assignment("n1"): _assignment("n1")})).outcome == "written"
            assert store.written_revision > 0
            assert await cache.wait_past(store.written_revision - 1, 5)
            assert cache.observed().assignments == {"n1": _assignment("n1")}
            assert cache.observed().leader == "a"
            await store.delete(store.keys.assignment("nobody"))  # deleted nothing: no revision to wait for
            assert store.written_revision <= cache.revision
        finally:
            await cache.close()


class _CompactedUnderIt(ClusterCache):
    """Right after its first read, more is written and the history compacted: the watch from
    the read's revision + 1 is refused and the cache must read again."""

    async def _load(self) -> None:
        await super()._load()
        if self.resyncs == 0:
            await self.store.put_status(NodeStatus(node="late", updated_at=1.0))
            await self.store.delete(self.store.keys.member("n000"))
            await self.store.compact(await self.store.current_revision())


async def test_a_compacted_revision_makes_the_cache_read_again(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        await _fill(store, 3)
        cache = _CompactedUnderIt(store, page_size=2)
        try:
            await cache.ensure()
            await until(lambda: cache.resyncs >= 1 and cache.synced, 10, what="a resync")
            assert "late" in cache.statuses and "n000" not in cache.members
            assert cache.observed() == await observe(store)
            await store.put_status(NodeStatus(node="after", updated_at=1.0))  # and it watches again
            await until(lambda: "after" in cache.statuses, 5, what="a write after the resync")
        finally:
            await cache.close()


async def test_a_record_that_does_not_decode_is_left_out_and_the_cache_goes_on(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        await store.put(store.keys.node_status("bad"), b"{not json")
        await store.put_status(NodeStatus(node="good", updated_at=1.0))
        cache = ClusterCache(store)
        try:
            await cache.ensure()
            assert set(cache.statuses) == {"good"}
            await store.put_status(NodeStatus(node="good2", updated_at=1.0))
            await store.put(store.keys.node_status("good"), b'{"node": 5}')  # breaks a known one
            await until(lambda: set(cache.statuses) == {"good2"}, 5, what="the broken status left out")
            await store.put_status(NodeStatus(node="bad", updated_at=1.0))
            await until(lambda: set(cache.statuses) == {"good2", "bad"}, 5, what="the fixed status")
            assert cache.synced and cache.resyncs == 0
        finally:
            await cache.close()


async def test_an_unused_cache_stops_by_itself(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        cache = ClusterCache(store, linger_s=0.3)
        try:
            await cache.ensure()
            assert cache.running
            await until(lambda: not cache.running, 5, what="the idle cache to stop")
            assert not cache.synced
            await cache.ensure()  # and starts again when asked
            assert cache.running and cache.synced
        finally:
            await cache.close()
        await asyncio.sleep(0)
        assert not cache.running


async def test_a_cache_that_lost_etcd_says_so_and_follows_again_when_it_is_back(tmp_path, cluster_name):
    with running_etcd(tmp_path) as etcd:
        async with Store([etcd.endpoint], cluster_name, timeout_s=1) as store:
            cache = ClusterCache(store)
            try:
                await store.put_status(NodeStatus(node="n1", updated_at=1.0))
                await cache.current(5)
                etcd.stop()  # the watch breaks; reading again fails while etcd is away
                await until(lambda: not cache.synced, 10, what="the cache to notice")
                with pytest.raises(CacheNotReady, match="not following etcd"):
                    await cache.current(0.5)
                assert set(cache.observed().statuses) == {"n1"}  # the last state stays readable
                etcd.start()
                await cache.current(15)
                assert cache.resyncs >= 1
                await store.put_status(NodeStatus(node="n2", updated_at=1.0))
                await until(lambda: "n2" in cache.statuses, 5, what="a write after etcd came back")
            finally:
                await cache.close()


async def test_read_again_reads_the_cluster_at_or_past_a_revision(etcd_server, cluster_name):
    """What a leader does when its own write's revision never comes by the watch (a revoked
    lease that held no key of ours): read everything again, at or past that revision."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        cache = ClusterCache(store)
        try:
            await cache.ensure()
            async with Store([etcd_server.endpoint], "elsewhere") as other:
                await other.put(other.keys.spec, b"{}")  # another cluster's write moves the store on
            await store.revoke_lease(await store.grant_lease(10))  # deletes nothing, yet a revision to wait for
            target = store.written_revision
            assert target > cache.revision
            assert not await cache.wait_past(target - 1, 0.3)  # nothing of ours changed: no event brings it
            await cache.read_again(target)
            assert cache.revision >= target and cache.resyncs == 1 and cache.synced
        finally:
            await cache.close()


async def test_the_cache_keeps_the_models_this_process_wrote_and_decodes_anything_else(etcd_server, cluster_name):
    """`encode`: the watch bringing back exactly the bytes written keeps the writer's own model
    (not decoded again); other bytes at that key (someone else's write) are decoded."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        await _fill(store, 2)
        cache = ClusterCache(store)
        try:
            await cache.ensure()
            mine = _assignment("n000", 3)
            record = SPEC.model_copy(update={"generation": 2})
            await store.put(store.keys.assignment("n000"), cache.encode(store.keys.assignment("n000"), mine))
            await store.put(store.keys.spec, cache.encode(store.keys.spec, record))
            await until(lambda: cache.record is not None and cache.record.generation == 2)
            assert cache.assignments["n000"] is mine and cache.record is record and cache.reused == 2
            cache.encode(store.keys.assignment("n001"), _assignment("n001", 3))
            theirs = _assignment("n001", 4)
            await store.put(store.keys.assignment("n001"), theirs.model_dump_json().encode())
            await until(lambda: len(cache.assignments["n001"].processes) == 4)
            assert cache.assignments["n001"] == theirs and cache.assignments["n001"] is not theirs
            assert cache.reused == 2
        finally:
            await cache.close()
