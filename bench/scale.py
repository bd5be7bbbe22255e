"""Control-plane cost at scale: N simulated agents against a real etcd, the coordinator hosted by
a real agent process, `GET /cluster` over real HTTP, and the proxy's real membership code.

Per N (a fresh etcd each, removed at the end):
- a real agent (`python -m agent.main`, node `coord`, not in the spec) hosts the coordinator
  and serves the REST API with a bearer token; its own process's CPU (psutil) and peak RSS
  (VmHWM) are measured, so the coordinator shares no GIL with anything of the benchmark;
- `--sim-procs` worker processes run the N simulated agents (many per process): each
  registers NodeFacts under its own lease (refreshed every ttl/3), watches its assignment key
  and writes a NodeStatus under its lease: every assigned process `starting`, then `ready`
  after `--load-time` (a proxy at once: it starts in a fraction of a second). Nothing is
  spawned. Leases have a TTL of 30 s (TTL), so the simulated agents' refreshes are no
  bottleneck on this machine;
- this process watches the cluster with the real `ClusterCache` (it counts the status
  changes and sees `ready`), and afterwards runs the proxy's real `EtcdSource` on its own cache.

It prints: POST /cluster/start -> phase `ready` minus the load time; the agent's CPU per
status change (from the POST to `ready`, over the status writes in that window); etcd's gRPC
bytes received/sent per status change (etcd's /metrics, every client's traffic, watches
included); `GET /cluster` (the document cached for the revision, and the first request after
a status change, which makes it); the proxy's cache first read, its cost per applied event,
and its routing refresh; the agent's peak RSS.

    python bench/scale.py --nodes 64 256 1024
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdsupervisor.api.client import ApiClient  # noqa: E402
from pdsupervisor.core.cluster_view import cluster_document  # noqa: E402
from pdsupervisor.core.etcd_command import etcd_argv  # noqa: E402
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus  # noqa: E402
from pdsupervisor.core.observed import Observed, is_ready  # noqa: E402
from pdsupervisor.local.ports import free_port  # noqa: E402
from pdsupervisor.local.procs import kill_tree  # noqa: E402
from pdsupervisor.proxy.etcd_source import EtcdSource  # noqa: E402
from pdsupervisor.proxy.instances import Registry  # noqa: E402
from pdsupervisor.store.cache import ClusterCache  # noqa: E402
from pdsupervisor.store.embedded import etcd_binary  # noqa: E402
from pdsupervisor.store.etcd import Store, StoreUnavailable, WatchEvent  # noqa: E402

TTL = 30  # member, leader and spec leases; refreshes every 10 s
COORD = "coord"  # the agent hosting the coordinator (not in the spec)


def spec_doc(cluster: str, endpoint: str, nodes: list[str], engines: int) -> dict[str, Any]:
    half = len(nodes) // 2
    argv = ["{python}", "-m", "pdsupervisor.simengine", "--port", "{port}", "-tp", "{tp}"]

    def role(names: list[str], port: int) -> dict[str, Any]:
        return {"node_names": names, "tp": 1, "slots": engines, "base_port": port, "argv": argv,
                "readiness": {"path": "/health", "period_s": 1}, "stop_timeout_s": 5}
    return {
        "cluster": cluster, "model": "sim-model", "etcd": {"endpoints": [endpoint]},
        "mooncake": {"enabled": False},
        "prefill": role(nodes[:half], 13100), "decode": {**role(nodes[half:], 13200), "dp_master_port": 13300},
        "proxy": {"kind": "builtin", "port": 13868},
        "policy": {"node_loss": "wait", "lease_ttl_s": TTL},
        "host_requirements": {"thp_mode": None},
    }


# ---- the simulated agents (in worker processes) ----------------------------------------------

class SimAgent:
    """Registration, assignment watch and status reports of one node, without processes."""

    def __init__(self, name: str, store: Store, load_s: float, engines: int) -> None:
        self.name, self.store, self.load_s, self.engines = name, store, load_s, engines
        i = int(name[1:])  # n1, n2, ...: a loopback address of its own, so its engines' endpoints are its own
        self.ip = f"127.1.{i // 250}.{i % 250 + 1}"
        self.lease = 0
        self.procs: dict[str, ProcessStatus] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty = asyncio.Event()

    async def run(self) -> None:
        await self._register()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._refresh())
            tg.create_task(self._watch())
            tg.create_task(self._reporter())

    async def _register(self) -> None:
        self.lease = await self.store.grant_lease(TTL)
        facts = NodeFacts(name=self.name, ip=self.ip, hostname=self.name, cpu_count=64,
                          accelerators=self.engines, agent_version="bench", registered_at=time.time(),
                          lease=self.lease)
        await self.store.register_member(facts, self.lease)

    async def _refresh(self) -> None:
        """As agent/registration.py: a lease found gone is replaced, the status written again."""
        while True:
            await asyncio.sleep(TTL / 3)
            with contextlib.suppress(StoreUnavailable):
                if await self.store.refresh_lease(self.lease) <= 0:
                    print(f"{self.name}: lease lost, registering again", file=sys.stderr, flush=True)
                    await self._register()
                    self._dirty.set()

    async def _watch(self) -> None:
        key = self.store.keys.assignment(self.name)
        while True:
            try:
                kv, rev = await self.store.read(key)
                await self._apply(NodeAssignment.model_validate_json(kv.value) if kv else None)
                async for ev in self.store.watch_key(key, rev + 1):
                    await self._apply(NodeAssignment.model_validate_json(ev.value) if ev.value else None)
            except StoreUnavailable as exc:
                print(f"{self.name}: assignment watch: {exc}", file=sys.stderr, flush=True)
                await asyncio.sleep(1)

    async def _apply(self, assignment: NodeAssignment | None) -> None:
        specs = {p.name: p for p in (assignment.processes if assignment else [])}
        now = time.time()
        kept = {n: s for n, s in self.procs.items() if n in specs and s.spec_hash == specs[n].spec_hash()}
        if set(kept) == set(self.procs) == set(specs):
            return
        self.procs = {n: kept.get(n) or _status(p, ProcessState.starting, now) for n, p in specs.items()}
        self._dirty.set()
        for n, p in specs.items():
            if n not in kept:  # each new (or changed) process becomes ready after the load time
                task = asyncio.create_task(self._become_ready(p))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _become_ready(self, spec: ProcessSpec) -> None:
        await asyncio.sleep(0.1 if spec.role == "proxy" else self.load_s)
        cur = self.procs.get(spec.name)
        if cur is not None and cur.spec_hash == spec.spec_hash() and cur.state != ProcessState.ready:
            self.procs[spec.name] = _status(spec, ProcessState.ready, time.time())
            self._dirty.set()

    async def _reporter(self) -> None:
        """Coalesced like the reconciler's: the engines that became ready together, one write."""
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.05)
            self._dirty.clear()
            with contextlib.suppress(StoreUnavailable):
                await self.store.put_status(NodeStatus(node=self.name, updated_at=time.time(), lease=self.lease,
                                                       processes=list(self.procs.values())))


def _status(p: ProcessSpec, state: ProcessState, now: float, pid: int = 4242) -> ProcessStatus:
    return ProcessStatus(name=p.name, role=p.role, state=state, pid=pid, started_at=now, spec_hash=p.spec_hash(),
                         generation=p.generation, endpoint=p.endpoint, dp_rank=p.dp_rank,
                         ready_after_s=0.0 if state == ProcessState.ready else None)


async def sim_worker(args: argparse.Namespace) -> None:
    """One worker process: the simulated agents named in --names, until SIGTERM."""
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    async with Store([args.etcd], args.cluster, timeout_s=15) as store:
        agents = [SimAgent(name, store, args.load_time, args.engines) for name in args.names.split(",")]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*(a.run() for a in agents))


# ---- this process: etcd, the agent, measurements ---------------------------------------------

class CountingCache(ClusterCache):
    """The real cache, counting the status changes it applies and the time applying events takes."""

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(store, **kw)
        self.status_changes = 0
        self.applied = 0
        self.apply_s = 0.0

    def _apply(self, event: WatchEvent) -> None:
        t = time.perf_counter()
        super()._apply(event)
        self.apply_s += time.perf_counter() - t
        self.applied += 1
        if event.key.startswith(self.keys.status):
            self.status_changes += 1


def all_ready(obs: Observed, nodes: int) -> bool:
    """Every node of the spec assigned, the proxy assigned, every assigned process ready."""
    if obs.record is None or len(obs.assignments) < nodes:
        return False
    procs = [(n, p) for n, a in obs.assignments.items() for p in a.processes]
    return any(p.role == "proxy" for _, p in procs) and all(is_ready(obs, n, p) for n, p in procs)


def engines_ready(obs: Observed) -> bool:
    """Every assigned engine (all but the proxy) ready: the moment the issue's `ready` target counts from."""
    return all(is_ready(obs, n, p) for n, a in obs.assignments.items() for p in a.processes if p.role != "proxy")


def etcd_bytes(url: str) -> tuple[float, float]:
    """etcd's gRPC bytes (received, sent) since it started; NaN when /metrics says nothing."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()

    def total(name: str) -> float:
        found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(v) for v in found) if found else float("nan")
    return (total("etcd_network_client_grpc_received_bytes_total"),
            total("etcd_network_client_grpc_sent_bytes_total"))


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class Children:
    """Every process this benchmark starts, each in its own session: killed as whole trees at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, str] = {}

    def start(self, argv: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):  # the workers and the agent before etcd
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    kill_tree(proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in its session
            proc.wait()

    def dead(self) -> list[str]:
        return [f"{self.logs[p.pid]} (its process) exited {p.returncode}" for p in self.procs if p.poll() is not None]


def start_etcd(children: Children) -> str:
    port, peer = free_port(), free_port()
    argv = etcd_argv(name="scale", data_dir=str(children.tmp / "etcd-data"), client_host="127.0.0.1",
                     client_port=port, peer_port=peer, binary=etcd_binary())
    proc = children.start(argv, "etcd.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"etcd did not start (log in {children.tmp / 'etcd.log'})") from None
            time.sleep(0.2)


def start_agent(children: Children, url: str, cluster: str, token: str) -> tuple[subprocess.Popen[bytes], str]:
    """The real agent that hosts the coordinator, its REST API behind a bearer token."""
    state = children.tmp / "coord"
    state.mkdir(mode=0o700)
    token_file = children.tmp / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    (state / "agent.yaml").write_text(json.dumps({"rest": {"token_file": str(token_file)}}))
    port = free_port()
    argv = [sys.executable, "-m", "agent.main", "--config", str(state / "agent.yaml"), "--name", COORD,
            "--ip", "127.0.0.1", "--cluster", cluster, "--etcd", url, "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(state), "--ttl", str(TTL), "--accelerators", "0", "--log-level", "info"]
    return children.start(argv, "agent.log"), f"http://127.0.0.1:{port}"


async def until(what: str, check: Any, timeout: float, children: Children, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        if dead := children.dead():
            raise RuntimeError(f"{what}: {'; '.join(dead)} (logs in {children.tmp})")
        await asyncio.sleep(interval)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def get_cluster(session: aiohttp.ClientSession, api: str) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    async with session.get(api + "/cluster") as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"GET /cluster answered {resp.status}: {body}")
    return body, (time.perf_counter() - t) * 1000


async def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    cluster = f"scale{n}"
    nodes = [f"n{i + 1}" for i in range(n)]
    row: dict[str, Any] = {"nodes": n, "engines": n * args.engines}
    tmp = Path(tempfile.mkdtemp(prefix=f"pdscale{n}-"))
    children = Children(tmp)
    cache: CountingCache | None = None
    store: Store | None = None
    try:
        url = start_etcd(children)
        token = os.urandom(16).hex()
        agent, api = start_agent(children, url, cluster, token)
        agent_ps = psutil.Process(agent.pid)
        store = Store([url], cluster, timeout_s=15)
        await store.connect()
        cache = CountingCache(store)
        await until("the agent to lead", lambda: _leader_is(store, COORD), 30, children)
        t = time.perf_counter()
        per = -(-n // args.sim_procs)
        for i in range(0, n, per):
            children.start([sys.executable, str(Path(__file__).resolve()), "--sim-worker", "--etcd", url,
                            "--cluster", cluster, "--names", ",".join(nodes[i:i + per]),
                            "--load-time", str(args.load_time), "--engines", str(args.engines)], f"sims-{i}.log")
        await cache.ensure(30)

        async def registered() -> bool:
            return len(cache.members) >= n + 1
        await until("every simulated agent to register", registered, 120, children)
        row["register_s"] = time.perf_counter() - t
        await asyncio.sleep(1.0)  # the agent's cycles after the registrations are not the window's

        spec = json.dumps(spec_doc(cluster, url, nodes, args.engines))
        changes0, cpu0, (rx0, tx0) = cache.status_changes, cpu_s(agent_ps), etcd_bytes(url)
        t0 = time.perf_counter()
        answer = await ApiClient(api, token=token, timeout_s=30).start(spec)
        row["post_ms"] = (time.perf_counter() - t0) * 1000

        seen: dict[str, float] = {}  # when this poll first saw every node assigned, every engine ready

        async def ready() -> bool:
            obs, now = cache.observed(), time.perf_counter()
            if len(obs.assignments) >= n:
                seen.setdefault("assigned", now)
                if engines_ready(obs):
                    seen.setdefault("engines", now)
            return all_ready(obs, n)
        await until("phase ready", ready, args.timeout, children, interval=0.05)
        done = time.perf_counter()
        row["ready_s"] = done - t0 - args.load_time
        row["assigned_s"] = seen["assigned"] - t0
        row["after_engines_s"] = done - seen.get("engines", done)
        changes, cpu, (rx, tx) = cache.status_changes - changes0, cpu_s(agent_ps) - cpu0, etcd_bytes(url)
        row.update(generation=answer.generation, status_changes=changes, coord_cpu_ms=cpu / changes * 1000,
                   agent_cpu_s=cpu, etcd_rx=(rx - rx0) / changes, etcd_tx=(tx - tx0) / changes,
                   processes=sum(len(a.processes) for a in cache.observed().assignments.values()),
                   assignments_kib=sum(len(a.model_dump_json()) for a in cache.observed().assignments.values()) / 1024)

        async with aiohttp.ClientSession() as session:
            doc, first_ms = await get_cluster(session, api)
            if doc["phase"] != "ready":
                raise RuntimeError(f"the processes are ready but GET /cluster says {doc['phase']}: "
                                   f"{doc.get('problems', [])[:2]}")
            row["get_first_ms"] = first_ms
            cached = [(await get_cluster(session, api))[1] for _ in range(args.calls)]
            row.update(get_cached_p50=statistics.median(cached), get_cached_p99=percentile(cached, 0.99))
            row["get_changed"] = await changed_gets(session, api, store, cache, args.calls)

        source = EtcdSource(Store([url], cluster, timeout_s=15), Registry())
        proxy_cache = source.cluster = CountingCache(source.store)
        t = time.perf_counter()
        await proxy_cache.ensure(60)
        row["proxy_read_ms"] = (time.perf_counter() - t) * 1000
        refresh = []
        for _ in range(args.calls):
            t = time.perf_counter()
            source.refresh()
            refresh.append((time.perf_counter() - t) * 1000)
        row.update(refresh_p50=statistics.median(refresh), refresh_p99=percentile(refresh, 0.99),
                   routed=sum(len(source.registry.instances(r)) for r in ("prefill", "decode")),
                   apply_us=cache.apply_s / max(cache.applied, 1) * 1e6)
        await proxy_cache.close()
        await source.store.close()
        row["agent_rss_mib"] = agent_ps.memory_info().rss / 2**20
        row["agent_peak_rss_mib"] = peak_rss_mib(agent.pid)
        t = time.perf_counter()  # what a document costs to make, alone in this process (no HTTP, no GIL shared)
        cluster_document(cache.observed(), time.time())
        row["document_ms"] = (time.perf_counter() - t) * 1000
    except Exception as exc:  # reported; the next N goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        with contextlib.suppress(Exception):
            row["agent_log"] = (tmp / "agent.log").read_text(errors="replace")[-1500:]
    finally:
        if cache is not None:
            await cache.close()
        if store is not None:
            await store.close()
        children.stop_all()
        if args.keep:
            print(f"  logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


async def _leader_is(store: Store, name: str) -> bool:
    with contextlib.suppress(StoreUnavailable):
        return await store.leader() == name
    return False


async def changed_gets(session: aiohttp.ClientSession, api: str, store: Store, cache: ClusterCache,
                       calls: int) -> list[float]:
    """GET /cluster right after a status change: one node's first engine reports another pid; the
    first answer that shows it is the one that made the document (earlier ones were the old,
    cached one). Its latency, per change."""
    out = []
    node = sorted(cache.statuses)[-1]
    for i in range(calls):
        status = cache.statuses[node]
        procs = list(status.processes)
        pid = 50_000 + i
        procs[0] = procs[0].model_copy(update={"pid": pid})
        await store.put_status(status.model_copy(update={"processes": procs, "updated_at": time.time()}))
        deadline = time.monotonic() + 30
        while True:
            doc, ms = await get_cluster(session, api)
            if any(r["node"] == node and r["name"] == procs[0].name and r["pid"] == pid for r in doc["processes"]):
                out.append(ms)
                break
            if time.monotonic() > deadline:
                raise TimeoutError("GET /cluster never showed a status change")
    return out


def show(row: dict[str, Any]) -> None:
    print(f"\n== {row['nodes']} nodes, {row['engines']} engines ==")
    if "register_s" in row:
        print(f"  all registered in {row['register_s']:.2f} s")
    if "ready_s" in row:
        print(f"  POST /cluster/start -> ready, minus the load time: {row['ready_s']:.2f} s "
              f"(the POST itself {row['post_ms']:.0f} ms)")
        print(f"  POST -> every node assigned: {row['assigned_s']:.2f} s; last engine ready -> every process "
              f"ready (the proxy too): {row['after_engines_s']:.2f} s")
        print(f"  status changes in that window: {row['status_changes']}; the agent's CPU then: {row['agent_cpu_s']:.2f} s")
        print(f"  coordinator (its agent's) CPU per status change: {row['coord_cpu_ms']:.2f} ms")
        print(f"  etcd bytes per status change: received {row['etcd_rx']:,.0f}, sent {row['etcd_tx']:,.0f}")
        print(f"  {row['processes']} processes assigned, assignments {row['assignments_kib']:.0f} KiB in all")
    if "get_cached_p50" in row:
        ch = row["get_changed"]
        print(f"  GET /cluster: first after ready {row['get_first_ms']:.0f} ms; unchanged revision p50 "
              f"{row['get_cached_p50']:.1f} ms, p99 {row['get_cached_p99']:.1f} ms; after a status change "
              f"p50 {statistics.median(ch):.0f} ms, max {max(ch):.0f} ms")
    if "document_ms" in row:
        print(f"  cluster_document alone (in this process, from the cache): {row['document_ms']:.0f} ms")
    if "refresh_p50" in row:
        print(f"  proxy: cache first read {row['proxy_read_ms']:.0f} ms; cache cost per applied event "
              f"{row['apply_us']:.0f} us; routing refresh p50 {row['refresh_p50']:.2f} ms, p99 "
              f"{row['refresh_p99']:.2f} ms ({row['routed']} endpoints routed)")
    if "agent_peak_rss_mib" in row:
        print(f"  the coordinator's agent: RSS {row['agent_rss_mib']:.0f} MiB, peak {row['agent_peak_rss_mib']:.0f} MiB")
    if "error" in row:
        print(f"  FAILED: {row['error']}")
        if "agent_log" in row:
            print("  agent log tail:\n    " + row["agent_log"].replace("\n", "\n    "))
    sys.stdout.flush()


def table(rows: list[dict[str, Any]]) -> None:
    print("\n| nodes | engines | ready - load s | POST -> assigned s | last engine -> ready s | status changes "
          "| coord CPU ms/change | etcd rx B/change "
          "| etcd tx B/change | GET /cluster cached p50 / after a change p50 ms | proxy refresh p50 ms "
          "| agent peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['nodes']} | {r['engines']} | failed: {r['error'][:120]} | | | | | | | | | |")
            continue
        print(f"| {r['nodes']} | {r['engines']} | {r['ready_s']:.2f} | {r['assigned_s']:.2f} "
              f"| {r['after_engines_s']:.2f} | {r['status_changes']} | {r['coord_cpu_ms']:.2f} "
              f"| {r['etcd_rx']:,.0f} | {r['etcd_tx']:,.0f} | {r['get_cached_p50']:.1f} / "
              f"{statistics.median(r['get_changed']):.0f} | {r['refresh_p50']:.2f} | {r['agent_peak_rss_mib']:.0f} |")


async def main(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # every child is stopped in run_one's finally
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    rows = []
    for n in args.nodes:
        rows.append(await run_one(n, args))
        show(rows[-1])
    table(rows)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--load-time", type=float, default=2.0, help="simulated engine load time (s)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per N, POST to ready (s)")
    ap.add_argument("--engines", type=int, default=8, help="engines per node (slots, tp 1)")
    ap.add_argument("--sim-procs", type=int, default=2, help="worker processes for the simulated agents")
    ap.add_argument("--calls", type=int, default=20, help="GET /cluster and refresh calls timed per N")
    ap.add_argument("--keep", action="store_true", help="keep each N's logs (etcd, agent, workers)")
    # a worker process of simulated agents (started by the benchmark itself)
    ap.add_argument("--sim-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--etcd", help=argparse.SUPPRESS)
    ap.add_argument("--cluster", help=argparse.SUPPRESS)
    ap.add_argument("--names", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sim_procs < 1:
        ap.error("--sim-procs must be at least 1")
    return args


if __name__ == "__main__":
    parsed = parse()
    asyncio.run(sim_worker(parsed) if parsed.sim_worker else main(parsed))
