"""Shared pieces of the orchestration and failover benchmarks (not a benchmark itself).

A LocalCluster on private ports (nothing in the demo's 2379 / 8470+ / 8868, none that the
tests' free_port hands out: localcluster.BENCH_PORTS), a spec generator for N one-engine
nodes, and a poller that timestamps what `GET /cluster` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdsupervisor.api.client import ApiClient, ApiError  # noqa: E402
from pdsupervisor.cli.doctor import port_check  # noqa: E402
from pdsupervisor.core.documents import ClusterDocument, ProcessRow  # noqa: E402
from pdsupervisor.core.spec import load_spec  # noqa: E402
from pdsupervisor.local.cluster import BootError, LocalCluster  # noqa: E402

# Private ports, all in localcluster.BENCH_PORTS (12000-12999), away from the demo's.
ETCD_PORT = 12379          # and 12380 for peers
API_BASE_PORT = 12400      # 12400 .. 12400+N-1
PREFILL_PORT = 12100
DECODE_PORT = 12200
PROXY_PORT = 12868


def engine_argv(role: str, load_time: float) -> list[str]:
    kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
    return ["{python}", "-m", "pdsupervisor.simengine", "--model", "{model}", "--host", "{host}", "--port", "{port}",
            "-tp", "{tp}", "--max-model-len", "8192",
            "--kv-transfer-config",
            json.dumps({"kv_connector": "MooncakeStoreConnector", "kv_role": kv_role}, separators=(",", ":")),
            "--sim-load-time", str(load_time)]


def make_spec(cluster: str, prefill_nodes: list[str], decode_nodes: list[str], *, slots: int, load_time: float,
              period_s: float, ttl: int, etcd_members: int = 1) -> str:
    """The demo's spec, with our ports, no Mooncake master, and any number of nodes; with
    `etcd_members` > 1 every member (node1..N) as the engines' and proxy's etcd endpoints."""
    def role(nodes: list[str], name: str, port: int) -> dict[str, Any]:
        return {"node_names": nodes, "tp": 1, "slots": slots, "base_port": port, "argv": engine_argv(name, load_time),
                "readiness": {"path": "/health", "period_s": period_s}, "stop_timeout_s": 5}
    doc = {
        "cluster": cluster, "model": "sim/deepseek-r1-tiny",
        "etcd": {"bootstrap_node": "node1", "client_port": ETCD_PORT, "peer_port": ETCD_PORT + 1},
        "mooncake": {"enabled": False},
        "prefill": role(prefill_nodes, "prefill", PREFILL_PORT),
        "decode": role(decode_nodes, "decode", DECODE_PORT),
        "proxy": {"kind": "builtin", "port": PROXY_PORT},
        "policy": {"node_loss": "wait", "lease_ttl_s": max(ttl, 2)},
        "host_requirements": {"thp_mode": None, "hard": []},
    }
    if etcd_members > 1:
        doc["etcd"]["endpoints"] = [f"127.0.0.{i + 1}:{ETCD_PORT}" for i in range(etcd_members)]
    return yaml.safe_dump(doc, sort_keys=False)


def new_cluster(name: str, nodes: int, ttl: int, *, tls: bool = False, token: bool = False,
                etcd_members: int = 1) -> LocalCluster:
    """With `tls` and `token` as the demo: etcd over TLS with client certificates, the agents'
    writes behind a bearer token (`lc.client(i)` carries it); `etcd_members`: node1..N each run one."""
    root = Path(tempfile.mkdtemp(prefix=f"pdbench-{name}-"))
    return LocalCluster(cluster=name, root=root, nodes=nodes, etcd_port=ETCD_PORT, api_base_port=API_BASE_PORT, ttl=ttl,
                        tls=tls, token=token, etcd_members=etcd_members)


async def boot(lc: LocalCluster, spec_text: str, timeout: float = 180.0) -> float:
    """Start every agent and wait until all are registered; returns seconds taken."""
    ports = port_check(lc.ports_needed(load_spec(spec_text)))
    if ports.status != "OK":
        raise SystemExit(f"ports already in use: {ports.found} (another bench running?)")
    try:
        return await lc.boot(timeout, poll_s=0.2)
    except BootError as exc:
        raise SystemExit(str(exc)) from None


_last_error: list[str] = []


async def get_cluster(client: ApiClient) -> ClusterDocument | None:
    try:
        return await client.cluster()
    except (TimeoutError, OSError, ApiError) as exc:
        msg = f"{type(exc).__name__}: {exc}"[:200]
        if not _last_error or _last_error[-1] != msg:
            print(f"    (GET /cluster failed: {msg})", flush=True)
            _last_error.append(msg)
        return None


async def wait_doc(client: ApiClient, pred, timeout: float, interval: float = 0.05) -> tuple[float, ClusterDocument]:
    """Poll GET /cluster until pred(doc); returns (wall time of the answer, doc)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = await get_cluster(client)
        now = time.time()
        if doc is not None and pred(doc):
            return now, doc
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout}s; last phase {doc and doc.phase}")
        await asyncio.sleep(interval)


def row(doc: ClusterDocument, node: str, name: str) -> ProcessRow | None:
    return next((p for p in doc.processes if p.node == node and p.name == name), None)


def poller(lc: LocalCluster, avoid: set[str] = frozenset()) -> ApiClient:
    """A client of the last agent not in `avoid` (a victim's API is away), with the token if any."""
    index = max(i for i, a in enumerate(lc.agents) if a.name not in avoid)
    return lc.client(index, timeout_s=3)


async def back_to_ready(lc: LocalCluster, timeout: float = 90, avoid: set[str] = frozenset(),
                        dead_pids: set[int] = frozenset(), generation: int = 0,
                        settle: float = 0.0) -> tuple[float, bool]:
    """Ready with every member back, at `generation` or later, and no row still showing a pid we killed.

    With `settle`, ready must then hold that long (answers that fail do not break it): the time
    returned is the start of the stretch that held. Returns (time, stale): stale is True if
    GET /cluster said `ready` on the way while a killed pid was still listed (status left over
    from a dead agent)."""
    stale = False

    def pred(d: ClusterDocument) -> bool:
        nonlocal stale
        if d.phase != "ready" or len(d.members) != len(lc.agents) or d.generation < generation:
            return False
        if any(p.pid in dead_pids for p in d.processes):
            stale = True
            return False
        return True

    client = poller(lc, set(avoid))
    deadline = time.monotonic() + timeout
    while True:
        t, _ = await wait_doc(client, pred, deadline - time.monotonic(), interval=0.1)
        if settle <= 0:
            return t, stale
        try:
            await wait_doc(client, lambda d: not pred(d), settle, interval=0.1)
        except TimeoutError:
            return t, stale  # held for `settle`


# pdsupervisor.host.logsetup's lines: "<iso local time> [info     ] <message> [<logger>]"
_LISTEN = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+) \[info\s*\] (?:sim engine|proxy) .*listening on "
                     r".*\[pdsupervisor\.(?:simengine|proxy)\]$")


def engine_listen_times(log_path: Path) -> list[float]:
    """Wall times of the sim-engine's / proxy's 'listening on' lines (ISO local time, microseconds)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in log_path.read_text(errors="replace").splitlines():
            m = _LISTEN.match(line)
            if m:
                out.append(datetime.fromisoformat(m.group(1)).timestamp())
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def create_time(pid: int | None) -> float | None:
    """Wall time a process started, to one clock tick (10 ms).

    Not psutil's create_time(): it adds /proc/stat's btime, a whole second, so it can be
    up to 1 s off. Here: now - (uptime now - the process's start in ticks since boot).
    """
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat, counting from after "(comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / _TICK)
    except (OSError, ValueError, IndexError):
        return None


def standalone_engine_startup(runs: int, load_time: float, port: int = 12990) -> list[float]:
    """Seconds from Popen of a lone sim-engine to its /health first answering 200 (10 ms polls)."""
    results = []
    for _ in range(runs):
        argv = [sys.executable, "-m", "pdsupervisor.simengine", "--model", "sim/x", "--host", "127.0.0.1",
                "--port", str(port), "--sim-load-time", str(load_time)]
        t0 = time.time()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            while True:
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                        break
                if p.poll() is not None or time.time() - t0 > 30:
                    raise SystemExit("standalone sim-engine did not come up")
                time.sleep(0.01)
            results.append(time.time() - t0)
        finally:
            p.kill()
            p.wait(5)
    return results


def summary(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"median {statistics.median(xs):.3f} s, max {max(xs):.3f} s (n={len(xs)})"


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (f"nproc {os.cpu_count()}, {model}, Python {sys.version.split()[0]}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}, loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def finish(lc: LocalCluster) -> None:
    lc.stop_agents(timeout=5)
    left = lc.kill_all(grace_s=3)
    print(f"cleanup: {len(left)} leftover process(es) ended (etcd and engines); state in {lc.root}", flush=True)
