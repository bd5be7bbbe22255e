"""The proxy reads its instances live from etcd: engines join and leave without a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import time

from aiohttp import web

from pdsupervisor.aio import serve
from pdsupervisor.aio.wait import cancel_and_wait, wait_event
from pdsupervisor.core.models import NodeFacts, NodeStatus, ProcessState, ProcessStatus
from pdsupervisor.local.ports import free_port
from pdsupervisor.proxy.etcd_source import MEMBERSHIP, EtcdSource, membership
from pdsupervisor.proxy.instances import Registry
from pdsupervisor.store.etcd import Keys, Store, WatchEvent
from tests.conftest import until
from tests.pdproc import http, metric, wait_for


async def _register(etcd: str, cluster: str, node: str, role: str, endpoint: str, state=ProcessState.ready) -> None:
    """Write what an agent writes: its member key under a lease, and its node status."""
    async with Store([etcd], cluster) as store:
        lease = await store.grant_lease(60)
        await store.register_member(NodeFacts(name=node, ip="127.0.0.1", registered_at=time.time()), lease)
        proc = ProcessStatus(name=f"{role}-0", role=role, state=state, pid=1, endpoint=endpoint)
        await store.put_status(NodeStatus(node=node, updated_at=time.time(), processes=[proc]))


async def _drop_member(etcd: str, cluster: str, node: str) -> None:
    async with Store([etcd], cluster) as store:
        await store.delete(store.keys.member(node))


def _endpoints(base: str, role: str) -> list[str]:
    st = json.loads(http("GET", base + "/status")[1])
    return [i["endpoint"] for i in st["instances"] if i["role"] == role]


def test_engines_join_and_leave_live(procs, etcd_server, cluster_name):
    etcd = etcd_server.endpoint
    pre, _ = procs.engine("prefill")
    dec1, _ = procs.engine("decode")
    dec2, _ = procs.engine("decode")
    asyncio.run(_register(etcd, cluster_name, "node-a", "prefill", pre))
    asyncio.run(_register(etcd, cluster_name, "node-b", "decode", dec1))
    # a decode not ready yet must get no traffic
    asyncio.run(_register(etcd, cluster_name, "node-c", "decode", dec2, state=ProcessState.starting))
    base, _ = procs.proxy("--cluster", cluster_name, "--etcd", etcd)
    wait_for(lambda: _endpoints(base, "decode") == [dec1], timeout=10, what="initial membership")
    assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200

    asyncio.run(_register(etcd, cluster_name, "node-c", "decode", dec2))  # now ready
    wait_for(lambda: sorted(_endpoints(base, "decode")) == sorted([dec1, dec2]), timeout=10, what="dec2 to join")
    for _ in range(6):
        assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200
    assert metric(f"http://{dec2}", "vllm:request_success_total") >= 1

    asyncio.run(_drop_member(etcd, cluster_name, "node-b"))  # node lost
    wait_for(lambda: _endpoints(base, "decode") == [dec2], timeout=10, what="node-b to leave")
    before = metric(f"http://{dec1}", "vllm:request_success_total")
    for _ in range(3):
        assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200
    assert metric(f"http://{dec1}", "vllm:request_success_total") == before


def test_routing_cache_serves_while_etcd_is_away(procs, etcd_server, cluster_name, tmp_path):
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode")
    asyncio.run(_register(etcd_server.endpoint, cluster_name, "node-a", "prefill", pre))
    asyncio.run(_register(etcd_server.endpoint, cluster_name, "node-b", "decode", dec))
    cache = tmp_path / "routing.json"
    _, first = procs.proxy("--cluster", cluster_name, "--etcd", etcd_server.endpoint, "--routing-cache", str(cache))
    wait_for(lambda: cache.exists() and json.loads(cache.read_text()) == {"prefill": [pre], "decode": [dec]},
             timeout=10, what="routing cached")
    first.kill()
    first.wait(5)
    # restarted while etcd is unreachable: it serves what it last knew instead of nothing
    base, _ = procs.proxy("--cluster", cluster_name, "--etcd", f"127.0.0.1:{free_port()}", "--routing-cache", str(cache))
    assert http("POST", base + "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


class _SlowStopStore:
    """A store whose second read hangs, and whose reader then takes a while to stop when cancelled."""

    def __init__(self) -> None:
        self.keys = Keys("slow-stop")
        self.connects = 0
        self.reads = 0
        self.in_read = asyncio.Event()
        self.lose_watch = asyncio.Event()
        self.reconnected = asyncio.Event()
        self.reader_stopped = False
        self.reader_stopped_before_reconnect: bool | None = None

    async def connect(self) -> None:
        self.connects += 1
        if self.connects == 2:
            self.reader_stopped_before_reconnect = self.reader_stopped
            self.reconnected.set()

    async def snapshot(self, *, keys=(), prefixes=()) -> tuple[dict, int]:
        self.reads += 1
        if self.reads != 2:
            return {name: [] for name in (*keys, *prefixes)}, 1
        self.in_read.set()
        try:
            await asyncio.Event().wait()
        finally:  # cancelled: stops a little later (or at once when the source already moved on)
            await wait_event(self.reconnected, 1.0)
            self.reader_stopped = True
        return {}, 1

    async def watch_prefix(self, prefix: str, start_revision: int):
        if self.connects == 1:
            yield WatchEvent(key=self.keys.members + "n", value=b"{}", revision=start_revision)
            await self.lose_watch.wait()
        else:
            await asyncio.Event().wait()


def test_a_lost_watch_waits_for_the_refresh_under_way_before_reading_again():
    """The refresher cancelled with a lost watch has ended before the source reconnects:
    two refreshes never run at once."""

    async def go() -> None:
        store = _SlowStopStore()
        task = asyncio.ensure_future(EtcdSource(store, Registry()).run())  # type: ignore[arg-type]  # a fake store
        try:
            await until(store.in_read.is_set, 5, what="a refresh under way")
            store.lose_watch.set()
            await until(lambda: store.connects >= 2, 10, what="the source to reconnect")
            assert store.reader_stopped_before_reconnect is True
        finally:  # checked after: a failure above stays the one reported
            stuck = await cancel_and_wait([task], 5)
        assert stuck == []

    asyncio.run(go())


def test_sigterm_stops_a_proxy_whose_etcd_does_not_answer(procs, black_hole):
    """etcd's address drops every SYN: the membership source hangs connecting, SIGTERM still ends it at once."""
    base, p = procs.proxy("--cluster", "nowhere", "--etcd", black_hole)
    assert json.loads(http("GET", base + "/status")[1])["source"] == "etcd:nowhere"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0, procs.log(p)
    assert "Traceback" not in procs.log(p), procs.log(p)


class _DeafStore:
    """A store whose connect ignores a cancellation until the test lets it go."""

    def __init__(self) -> None:
        self.keys = Keys("deaf")
        self.connecting = asyncio.Event()
        self.let_go = asyncio.Event()
        self.gave_up = asyncio.Event()
        self.closed = False

    async def connect(self) -> None:
        self.connecting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await self.let_go.wait()
            self.gave_up.set()
            raise

    async def close(self) -> None:
        self.closed = True


def test_the_proxy_stops_within_the_bound_when_the_membership_source_does_not(monkeypatch, caplog):
    """The membership source's cleanup context waits STOP_TIMEOUT_S for the source, then goes
    on (and still closes the store): a stuck source cannot hold the proxy's shutdown."""
    monkeypatch.setattr(serve, "STOP_TIMEOUT_S", 0.3)

    async def go() -> None:
        store = _DeafStore()
        app = web.Application()
        app[MEMBERSHIP] = EtcdSource(store, Registry())  # type: ignore[arg-type]  # a fake store
        app.cleanup_ctx.append(membership)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await until(store.connecting.is_set, 5, what="the source to connect")
            t0 = time.monotonic()
            await runner.cleanup()
            took = time.monotonic() - t0
        finally:
            store.let_go.set()
        await until(store.gave_up.is_set, 5, what="the straggler to end")
        assert 0.3 <= took < 2 and store.closed
        assert "the etcd membership source did not stop within 0.3s; going on" in caplog.text

    asyncio.run(go())
