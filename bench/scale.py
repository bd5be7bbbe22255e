"""Control-plane cost at scale: N simulated agents against a real etcd and the real coordinator.

Each simulated agent is a small asyncio object (many per process) that does what a real
agent writes (agent/registration.py, agent/reconciler.py): its NodeFacts under `members/<node>`
under its own lease (refreshed every ttl/3), a watch on its assignment key, and a NodeStatus
under `status/<node>` with that lease id: every assigned process `starting`, then `ready`
after `--load-time` seconds. Nothing is spawned. The real `Coordinator` runs in its own thread
and event loop, and decides in that loop's one executor thread, so those two threads' CPU is
its CPU alone (its cycles and its watch).

Per N it prints: submit -> phase `ready` minus the load time; coordinator CPU per status write
(the coordinator threads' CPU from submit to ready over the simulated agents' status writes in
that window); etcd bytes received/sent per status write (etcd's own gRPC byte counters from
/metrics, over the same window: every client's traffic, watches included); `GET /cluster`
(observe + cluster_document) median/p99; the proxy's `EtcdSource.refresh`; peak RSS.
A fresh etcd per N, removed at the end.

    python bench/scale.py --nodes 64 256 1024
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.coordinator import Coordinator, Outcome  # noqa: E402
from agent.lease import LeaseState  # noqa: E402
from pdsupervisor.core.cluster_view import cluster_document  # noqa: E402
from pdsupervisor.core.etcd_command import etcd_argv  # noqa: E402
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus  # noqa: E402
from pdsupervisor.core.spec import ClusterSpec  # noqa: E402
from pdsupervisor.local.ports import free_port  # noqa: E402
from pdsupervisor.proxy.etcd_source import EtcdSource  # noqa: E402
from pdsupervisor.proxy.instances import Registry  # noqa: E402
from pdsupervisor.store.cluster import observe, submit_spec  # noqa: E402
from pdsupervisor.store.embedded import etcd_binary  # noqa: E402
from pdsupervisor.store.etcd import Store, StoreUnavailable  # noqa: E402

TTL = 30  # member and leader leases; refreshes every 10 s
ENGINES = 8  # per node (--engines)


def spec_doc(cluster: str, endpoint: str, nodes: list[str]) -> dict[str, Any]:
    half = len(nodes) // 2
    argv = ["{python}", "-m", "pdsupervisor.simengine", "--port", "{port}", "-tp", "{tp}"]

    def role(names: list[str], port: int) -> dict[str, Any]:
        return {"node_names": names, "tp": 1, "slots": ENGINES, "base_port": port, "argv": argv,
                "readiness": {"path": "/health", "period_s": 1}, "stop_timeout_s": 5}
    return {
        "cluster": cluster, "model": "sim-model", "etcd": {"endpoints": [endpoint]},
        "mooncake": {"enabled": False},
        "prefill": role(nodes[:half], 13100), "decode": {**role(nodes[half:], 13200), "dp_master_port": 13300},
        "proxy": {"kind": "builtin", "port": 13868},
        "policy": {"node_loss": "wait", "lease_ttl_s": TTL},
        "host_requirements": {"thp_mode": None},
    }


class SimAgent:
    """Registration, assignment watch and status reports of one node, without processes."""

    def __init__(self, name: str, store: Store, load_s: float, stats: dict[str, int]) -> None:
        self.name, self.store, self.load_s, self.stats = name, store, load_s, stats
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
        facts = NodeFacts(name=self.name, ip="127.0.0.1", hostname=self.name, cpu_count=64, accelerators=ENGINES,
                          agent_version="bench", registered_at=time.time(), lease=self.lease)
        await self.store.register_member(facts, self.lease)

    async def _refresh(self) -> None:
        """As agent/registration.py: a lease found gone is replaced, the status written again."""
        while True:
            await asyncio.sleep(TTL / 3)
            with contextlib.suppress(StoreUnavailable):
                if await self.store.refresh_lease(self.lease) <= 0:
                    self.stats["reregistered"] = self.stats.get("reregistered", 0) + 1
                    await self._register()
                    self._dirty.set()

    async def _watch(self) -> None:
        key = self.store.keys.assignment(self.name)
        kv, rev = await self.store.read(key)
        if kv is not None:
            await self._apply(NodeAssignment.model_validate_json(kv.value))
        async for ev in self.store.watch_key(key, rev + 1):
            await self._apply(NodeAssignment.model_validate_json(ev.value) if ev.value else None)

    async def _apply(self, assignment: NodeAssignment | None) -> None:
        specs = {p.name: p for p in (assignment.processes if assignment else [])}
        now = time.time()
        kept = {n: s for n, s in self.procs.items() if n in specs and s.spec_hash == specs[n].spec_hash()}
        self.procs = {n: kept.get(n) or _status(p, ProcessState.starting, now) for n, p in specs.items()}
        await self._report()
        for n, p in specs.items():
            if n not in kept:  # each new (or changed) process becomes ready after the load time
                task = asyncio.create_task(self._become_ready(p))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _become_ready(self, spec: ProcessSpec) -> None:
        await asyncio.sleep(self.load_s)
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
            await self._report()

    async def _report(self) -> None:
        await self.store.put_status(NodeStatus(node=self.name, updated_at=time.time(), lease=self.lease,
                                               processes=list(self.procs.values())))
        self.stats["status_writes"] += 1


def _status(p: ProcessSpec, state: ProcessState, now: float) -> ProcessStatus:
    return ProcessStatus(name=p.name, role=p.role, state=state, pid=4242, started_at=now, spec_hash=p.spec_hash(),
                         generation=p.generation, endpoint=p.endpoint, dp_rank=p.dp_rank,
                         ready_after_s=0.0 if state == ProcessState.ready else None)


class CoordinatorThread:
    """The real coordinator in its own thread and loop: its CPU is that thread's CPU."""

    def __init__(self, endpoint: str, cluster: str) -> None:
        self.endpoint, self.cluster = endpoint, cluster
        self.loop = asyncio.new_event_loop()
        self.errors: list[str] = []
        self.last: Outcome | None = None
        self.cycles = 0
        self.failing_since = 0.0  # monotonic: since when every cycle raised or found etcd failing
        # the coordinator decides in its loop's default executor (asyncio.to_thread): one
        # thread, whose CPU counts as the coordinator's too
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="coordinator-decide")
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = self._call(self._start())

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> asyncio.Task[None]:
        self.store = Store([self.endpoint], self.cluster)
        await self.store.connect()
        coord = Coordinator(self.store, "coordinator", LeaseState(TTL))
        cycle = coord.cycle

        async def recorded() -> Outcome:
            try:
                return await cycle()
            except Exception as exc:  # reported; the next N goes on
                msg = f"{type(exc).__name__}: {exc}"
                if not self.errors or self.errors[-1] != msg:
                    self.errors.append(msg)
                raise

        def seen(outcome: Outcome | None, _s: float) -> None:
            self.cycles += 1
            self.last = outcome or self.last
            failed = outcome is None or outcome.kind in ("unavailable", "deposed")
            self.failing_since = (self.failing_since or time.monotonic()) if failed else 0.0

        coord.cycle = recorded  # type: ignore[method-assign]
        coord.on_cycle = seen
        return asyncio.create_task(coord.run())

    def cpu(self) -> float:
        """CPU seconds of the coordinator's loop thread and of its decision thread."""
        threads = [self.thread, *self.executor._threads]  # the executor's own list: no public one
        return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads if t.ident is not None)

    def stop(self) -> None:
        async def stop() -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            await self.store.close()
        with contextlib.suppress(Exception):
            self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def etcd_bytes(url: str) -> tuple[float, float]:
    """etcd's gRPC bytes (received, sent) since it started; NaN when /metrics says nothing."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()

    def total(name: str) -> float:
        found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(v) for v in found) if found else float("nan")
    return (total("etcd_network_client_grpc_received_bytes_total"),
            total("etcd_network_client_grpc_sent_bytes_total"))


def start_etcd(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port, peer = free_port(), free_port()
    argv = etcd_argv(name="scale", data_dir=str(tmp / "etcd-data"), client_host="127.0.0.1", client_port=port,
                     peer_port=peer, binary=etcd_binary())
    proc = subprocess.Popen(argv, stdout=open(tmp / "etcd.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"etcd did not start (log in {tmp / 'etcd.log'})") from None
            time.sleep(0.2)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def timed(fn: Any, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def run_one(n: int, url: str, args: argparse.Namespace) -> dict[str, Any]:
    cluster = f"scale{n}"
    nodes = [f"n{i + 1}" for i in range(n)]
    stats = {"status_writes": 0}
    row: dict[str, Any] = {"nodes": n, "engines": n * ENGINES}
    agents_store, view_store = Store([url], cluster), Store([url], cluster)
    await agents_store.connect()
    await view_store.connect()
    coord = CoordinatorThread(url, cluster)
    tasks: list[asyncio.Task[None]] = []
    try:
        t = time.perf_counter()
        agents = [SimAgent(name, agents_store, args.load_time, stats) for name in nodes]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        while len((await observe(view_store)).members) < n:
            await asyncio.sleep(0.2)
        row["register_s"] = time.perf_counter() - t
        await asyncio.sleep(0.5)  # the coordinator's idle cycles are not the window's
        spec = ClusterSpec.model_validate(spec_doc(cluster, url, nodes))
        writes0, cpu0, (rx0, tx0) = stats["status_writes"], coord.cpu(), etcd_bytes(url)
        t0 = time.perf_counter()
        answer = await submit_spec(view_store, spec)
        if answer.status != 202:
            raise RuntimeError(f"submit answered {answer.status}: {answer.message}")
        deadline = t0 + args.timeout
        phase = "?"
        while phase != "ready":
            if time.perf_counter() > deadline:
                raise TimeoutError(f"not ready in {args.timeout} s: phase {phase}; coordinator's last outcome: "
                                   f"{coord.last and coord.last.message[:200]}; errors: {coord.errors[-1:]}")
            if coord.failing_since and time.monotonic() - coord.failing_since > args.give_up:
                raise RuntimeError(f"the coordinator failed every cycle for {args.give_up:.0f} s: "
                                   f"{coord.last and coord.last.message[:300]}")
            await asyncio.sleep(args.poll)
            doc = cluster_document(await observe(view_store), time.time())
            phase = f"{doc.phase} {doc.problems[:2]}" if doc.phase != "ready" else "ready"
        row["ready_s"] = time.perf_counter() - t0 - args.load_time
        writes, cpu, (rx, tx) = stats["status_writes"] - writes0, coord.cpu() - cpu0, etcd_bytes(url)
        row.update(status_writes=writes, coord_cpu_ms=cpu / writes * 1000, coord_cycles=coord.cycles,
                   etcd_rx=(rx - rx0) / writes, etcd_tx=(tx - tx0) / writes)
        obs = await observe(view_store)

        async def get_cluster() -> None:
            cluster_document(await observe(view_store), time.time())
        lat = await timed(get_cluster, args.calls)
        row.update(get_p50=statistics.median(lat), get_p99=percentile(lat, 0.99))
        source = EtcdSource(Store([url], cluster), Registry())
        await source.store.connect()
        ref = await timed(source.refresh, args.calls)
        await source.store.close()
        row.update(refresh_p50=statistics.median(ref), refresh_p99=percentile(ref, 0.99),
                   routed=sum(len(source.registry.instances(r)) for r in ("prefill", "decode")),
                   processes=sum(len(a.processes) for a in obs.assignments.values()),
                   doc_kib=sum(len(a.model_dump_json()) for a in obs.assignments.values()) / 1024)
    except Exception as exc:  # reported; the next N goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
    finally:
        row["coord_errors"] = coord.errors
        row["reregistered"] = stats.get("reregistered", 0)
        coord.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agents_store.close()
        await view_store.close()
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def show(row: dict[str, Any]) -> None:
    n = row["nodes"]
    print(f"\n== {n} nodes, {row['engines']} engines ==")
    if "register_s" in row:
        print(f"  all registered in {row['register_s']:.2f} s")
    if "ready_s" in row:
        print(f"  submit -> ready minus load time: {row['ready_s']:.2f} s")
        print(f"  status writes in that window: {row['status_writes']} (coordinator cycles so far: {row['coord_cycles']})")
        print(f"  coordinator CPU per status write: {row['coord_cpu_ms']:.2f} ms")
        print(f"  etcd bytes per status write: received {row['etcd_rx']:,.0f}, sent {row['etcd_tx']:,.0f}")
    if "get_p50" in row:
        print(f"  GET /cluster (observe + cluster_document): p50 {row['get_p50']:.1f} ms, p99 {row['get_p99']:.1f} ms")
        print(f"  proxy EtcdSource.refresh: p50 {row['refresh_p50']:.1f} ms, p99 {row['refresh_p99']:.1f} ms "
              f"({row['routed']} endpoints routed, {row['processes']} processes assigned)")
        print(f"  assignments total {row['doc_kib']:.0f} KiB (the coordinator writes them in fenced chunks)")
    if "error" in row:
        print(f"  FAILED: {row['error']}")
    if row["reregistered"]:
        print(f"  leases lost and registered again (event loop or etcd too slow): {row['reregistered']}")
    for err in row["coord_errors"]:
        print(f"  coordinator cycle raised: {err[:300]}")
    print(f"  peak RSS of this process so far: {row['peak_rss_mib']:.0f} MiB", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--load-time", type=float, default=2.0, help="simulated engine load time (s)")
    ap.add_argument("--timeout", type=float, default=180.0, help="per N, submit to ready (s)")
    ap.add_argument("--engines", type=int, default=8, help="engines per node (slots, tp 1)")
    ap.add_argument("--give-up", type=float, default=30.0,
                    help="stop waiting once every coordinator cycle failed this long (s)")
    ap.add_argument("--calls", type=int, default=20, help="GET /cluster and refresh calls timed per N")
    ap.add_argument("--poll", type=float, default=0.2, help="phase polling interval (s)")
    args = ap.parse_args()
    global ENGINES
    ENGINES = args.engines
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))  # the coordinator's logs: quiet
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # etcd is stopped and removed in the finally below
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    rows = []
    for n in args.nodes:
        tmp = Path(tempfile.mkdtemp(prefix=f"pdscale{n}-"))
        proc, url = start_etcd(tmp)
        try:
            rows.append(await run_one(n, url, args))
            show(rows[-1])
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n| nodes | engines | ready - load s | status writes | coord CPU ms/write | etcd rx B/write "
          "| etcd tx B/write | GET /cluster p50/p99 ms | refresh p50/p99 ms | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        if "ready_s" not in r:
            print(f"| {r['nodes']} | {r['engines']} | failed: {r.get('error', '')[:120]} | | | | | | | "
                  f"{r['peak_rss_mib']:.0f} |")
            continue
        gets = f"{r['get_p50']:.1f} / {r['get_p99']:.1f}" if "get_p50" in r else "-"
        refs = f"{r['refresh_p50']:.1f} / {r['refresh_p99']:.1f}" if "refresh_p50" in r else "-"
        print(f"| {r['nodes']} | {r['engines']} | {r['ready_s']:.2f} | {r['status_writes']} | {r['coord_cpu_ms']:.2f} "
              f"| {r['etcd_rx']:,.0f} | {r['etcd_tx']:,.0f} | {gets} | {refs} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
