"""The proxy reads its instances live from etcd: engines join and leave without a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
from aiohttp import web

from pdsupervisor.aio import serve
from pdsupervisor.aio.wait import cancel_and_wait
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus
from pdsupervisor.local.ports import free_port
from pdsupervisor.proxy.etcd_source import MEMBERSHIP, EtcdSource, membership
from pdsupervisor.proxy.instances import Registry
from pdsupervisor.store.etcd import Keys, Store
from tests.conftest import until
from tests.pdproc import http, metric, wait_for


async def _report(store: Store, node: str, lease: int, role: str, endpoint: str, state: ProcessState) -> None:
    """The node's status as its agent, holding `lease`, writes it: one engine."""
    proc = ProcessStatus(name=f"{role}-0", role=role, state=state, pid=1, endpoint=endpoint)
    await store.put_status(NodeStatus(node=node, updated_at=time.time(), lease=lease, processes=[proc]))


async def _register(etcd: str, cluster: str, node: str, role: str, endpoint: str, state=ProcessState.ready,
                    *, assigned: bool = False) -> int:
    """Write what an agent writes: its member key under a lease, its node status under that
    lease; with `assigned`, what the coordinator writes too: the node's assignment of that
    engine. The lease."""
    async with Store([etcd], cluster) as store:
        lease = await store.grant_lease(60)
        await store.register_member(NodeFacts(name=node, ip="127.0.0.1", registered_at=time.time(), lease=lease), lease)
        await _report(store, node, lease, role, endpoint, state)
        if assigned:
            host, _, port = endpoint.rpartition(":")
            spec = ProcessSpec(name=f"{role}-0", role=role, argv=["engine"], host=host, port=int(port))
            await store.put(store.keys.assignment(node), NodeAssignment(node=node, processes=[spec]).model_dump_json().encode())
    return lease


async def _drop_member(etcd: str, cluster: str, node: str) -> None:
    async with Store([etcd], cluster) as store:
        await store.delete(store.keys.member(node))


async def _agent_gone(etcd: str, cluster: str, lease: int) -> None:
    """The agent holding `lease` is gone and its lease with it: its member key disappears."""
    async with Store([etcd], cluster) as store:
        await store.revoke_lease(lease)


async def _unassign(etcd: str, cluster: str, node: str) -> None:
    """The coordinator plans the node away (or the cluster stops): its assignment key goes."""
    async with Store([etcd], cluster) as store:
        await store.delete(store.keys.assignment(node))


def _instances(base: str) -> dict[str, dict]:
    """The proxy's instances by endpoint, as `GET /status` shows them."""
    return {i["endpoint"]: i for i in json.loads(http("GET", base + "/status")[1])["instances"]}


def _endpoints(base: str, role: str) -> list[str]:
    return [ep for ep, i in _instances(base).items() if i["role"] == role]


def _sources(base: str) -> dict[str, str]:
    return {ep: i["source"] for ep, i in _instances(base).items()}


def engines_in_etcd(procs, etcd: str, cluster: str) -> tuple[str, str, str]:
    """A prefill (node-a) and a decode (node-b) registered ready, and a second decode not yet."""
    pre, _ = procs.engine("prefill")
    dec1, _ = procs.engine("decode")
    dec2, _ = procs.engine("decode")
    asyncio.run(_register(etcd, cluster, "node-a", "prefill", pre))
    asyncio.run(_register(etcd, cluster, "node-b", "decode", dec1))
    return pre, dec1, dec2


def test_engines_join_and_leave_live(procs, etcd_server, cluster_name):
    etcd = etcd_server.endpoint
    _, dec1, dec2 = engines_in_etcd(procs, etcd, cluster_name)
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

    asyncio.run(_drop_member(etcd, cluster_name, "node-b"))  # node lost, and no assignment keeps its engines
    wait_for(lambda: _endpoints(base, "decode") == [dec2], timeout=10, what="node-b to leave")
    before = metric(f"http://{dec1}", "vllm:request_success_total")
    for _ in range(3):
        assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200
    assert metric(f"http://{dec1}", "vllm:request_success_total") == before


def test_an_agent_away_leaves_its_engines_in_rotation_until_they_stop_answering(procs, etcd_server, cluster_name):
    """Membership is discovery, liveness the proxy's own: an engine whose agent is gone (member
    key revoked) keeps serving; killed, it leaves rotation on the proxy's probe, and gets
    nothing after."""
    etcd = etcd_server.endpoint
    pre, _ = procs.engine("prefill")
    dec1, p1 = procs.engine("decode")
    dec2, _ = procs.engine("decode")
    asyncio.run(_register(etcd, cluster_name, "node-p", "prefill", pre, assigned=True))
    lease1 = asyncio.run(_register(etcd, cluster_name, "node-1", "decode", dec1, assigned=True))
    asyncio.run(_register(etcd, cluster_name, "node-2", "decode", dec2, assigned=True))
    base, _ = procs.proxy("--cluster", cluster_name, "--etcd", etcd)
    wait_for(lambda: _sources(base) == {pre: "agent", dec1: "agent", dec2: "agent"}, timeout=10, what="initial membership")

    asyncio.run(_agent_gone(etcd, cluster_name, lease1))
    wait_for(lambda: _sources(base).get(dec1) == "last-known", timeout=10, what="dec1 routed on its last-known status")
    assert 'pdproxy_last_known_instances{role="decode"} 1.0' in http("GET", base + "/metrics")[1].decode()
    before = metric(f"http://{dec1}", "vllm:request_success_total")
    assert [http("POST", base + "/v1/completions", {"prompt": "x"})[0] for _ in range(6)] == [200] * 6
    assert metric(f"http://{dec1}", "vllm:request_success_total") > before  # still served, agent or not

    p1.kill()  # the engine itself dies: nobody tells etcd, the proxy's probe finds out
    p1.wait(5)
    wait_for(lambda: _instances(base)[dec1]["ejected"], timeout=10, what="dec1 ejected by a probe")
    assert _instances(base)[dec1]["ejected_reason"].startswith("probe: ")

    def tried_on_dec1() -> float:
        text = http("GET", base + "/metrics")[1].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("pdproxy_upstream_requests_total{") and f'instance="{dec1}"' in line)

    tried = tried_on_dec1()
    assert [http("POST", base + "/v1/completions", {"prompt": "x"})[0] for _ in range(6)] == [200] * 6
    assert tried_on_dec1() == tried  # nothing went to it once ejected
    text = http("GET", base + "/metrics")[1].decode()
    assert 'pdproxy_ejections_total{reason="probe_unreachable",role="decode"} 1.0' in text


def test_engines_leave_when_their_agent_says_so_or_the_coordinator_plans_them_away(procs, etcd_server, cluster_name):
    """Both engines answer their probes throughout: what takes them out is etcd's word, a
    current status saying not ready, or no assignment left for a node whose agent is away."""
    etcd = etcd_server.endpoint
    dec1, _ = procs.engine("decode")
    dec2, _ = procs.engine("decode")
    lease1 = asyncio.run(_register(etcd, cluster_name, "node-1", "decode", dec1, assigned=True))
    lease2 = asyncio.run(_register(etcd, cluster_name, "node-2", "decode", dec2, assigned=True))
    base, _ = procs.proxy("--cluster", cluster_name, "--etcd", etcd)
    wait_for(lambda: _sources(base) == {dec1: "agent", dec2: "agent"}, timeout=10, what="initial membership")

    async def stopping() -> None:  # node-1's current agent: its engine is being drained
        async with Store([etcd], cluster_name) as store:
            await _report(store, "node-1", lease1, "decode", dec1, ProcessState.stopping)

    asyncio.run(stopping())
    wait_for(lambda: _endpoints(base, "decode") == [dec2], timeout=10, what="dec1 out: its agent says stopping")

    asyncio.run(_agent_gone(etcd, cluster_name, lease2))
    wait_for(lambda: _sources(base) == {dec2: "last-known"}, timeout=10, what="dec2 routed on its last-known status")
    asyncio.run(_unassign(etcd, cluster_name, "node-2"))
    wait_for(lambda: _endpoints(base, "decode") == [], timeout=10, what="dec2 out: its node has no assignment")
    assert not any(i["ejected"] for i in _instances(base).values())


def test_a_stream_in_flight_ends_normally_when_its_decode_leaves_the_membership(etcd_server, cluster_name):
    """Leaving the membership only stops new requests: a stream under way runs to [DONE]."""
    from pdsupervisor.aio.serve import start_site
    from pdsupervisor.proxy.cli import build_app
    from pdsupervisor.proxy.config import ProxyConfig

    etcd = etcd_server.endpoint
    gate = asyncio.Event()

    async def healthy(request: web.Request) -> web.Response:
        return web.Response()

    async def prefill(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": " t0"}], "kv_transfer_params": {"k": 1}})

    async def decode(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"text": " t0"}]}\n\n')
        await gate.wait()  # until the test has seen the decode leave the membership
        await resp.write(b'data: {"choices": [{"text": " t1"}]}\n\ndata: [DONE]\n\n')
        return resp

    async def go() -> None:
        runners, eps = [], {}
        try:
            for role, handler in (("prefill", prefill), ("decode", decode)):
                app = web.Application()
                app.router.add_post("/v1/completions", handler)
                app.router.add_get("/health", healthy)
                port = free_port()
                runners.append(await start_site(app, "127.0.0.1", port))
                eps[role] = f"127.0.0.1:{port}"
            await _register(etcd, cluster_name, "node-p", "prefill", eps["prefill"], assigned=True)
            lease = await _register(etcd, cluster_name, "node-d", "decode", eps["decode"], assigned=True)
            registry, port = Registry(), free_port()
            runners.append(await start_site(build_app(ProxyConfig(port=port), registry, cluster=cluster_name, etcd=[etcd]),
                                            "127.0.0.1", port))
            await until(lambda: [i.endpoint for i in registry.instances("decode")] == [eps["decode"]], 10,
                        what="the decode in rotation")
            async with aiohttp.ClientSession() as s:
                body = {"prompt": "x", "max_tokens": 2, "stream": True}
                async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    first = await r.content.readline()
                    await _agent_gone(etcd, cluster_name, lease)
                    await _unassign(etcd, cluster_name, "node-d")
                    await until(lambda: not registry.instances("decode"), 10, what="the decode out of the membership")
                    gate.set()
                    rest = await r.read()
            assert r.status == 200 and first.startswith(b"data: ")
            assert rest.endswith(b"data: [DONE]\n\n") and b" t1" in rest
        finally:
            gate.set()
            for runner in reversed(runners):
                await runner.cleanup()

    asyncio.run(go())


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


async def test_the_routing_is_worked_out_once_per_change_of_members_statuses_or_assignments(
        etcd_server, cluster_name):
    """From the cache: no read of the cluster per change, and the spec, the leader key or an
    event (no input of the routing) cause no refresh at all."""
    lease = await _register(etcd_server.endpoint, cluster_name, "n1", "prefill", "127.0.0.1:9001")
    async with Store([etcd_server.endpoint], cluster_name) as store:
        source = EtcdSource(Store([etcd_server.endpoint], cluster_name), Registry())
        task = asyncio.ensure_future(source.run())
        try:
            await until(lambda: source.registry.instances("prefill"), 10, what="n1's engine routed")
            refreshes = source.refreshes
            await store.put(store.keys.spec, b'{"generation": 1, "spec": {}}')
            await store.put(store.keys.leader, b"someone")
            await store.append_event("x", "news")
            last = await store.current_revision()
            await until(lambda: source.seen_revision >= last, 10, what="the source to see those writes")
            assert source.refreshes == refreshes
            ranges = []
            source.store.on_request = lambda path, _s, _ok: ranges.append(path)
            await _report(store, "n1", lease, "prefill", "127.0.0.1:9001", ProcessState.starting)
            await until(lambda: not source.registry.instances("prefill"), 10, what="n1's engine out")
            assert source.refreshes == refreshes + 1 and ranges == []  # no read: the watch brought it
        finally:
            assert await cancel_and_wait([task], 5) == []
            await source.store.close()
        assert not source.cluster.running


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
