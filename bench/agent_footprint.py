"""Measure pd-agent's footprint at rest: RSS, CPU share of one core, etcd writes per second.

Starts a private etcd and one agent (a real subprocess) with a couple of trivial children,
waits until they are ready, then samples for `--duration` seconds. Everything started is
killed at the end. `GET /metrics` is scraped every `--scrape-every` seconds meanwhile, as
Prometheus would (0: never). Usage: python bench/agent_footprint.py [--duration 20] [--ttl 10]
[--scrape-every 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdsupervisor.core.etcd_command import etcd_argv  # noqa: E402
from pdsupervisor.core.models import NodeAssignment, NodeStatus, Probe, ProcessSpec  # noqa: E402
from pdsupervisor.local.cluster import MARKER_ENV  # noqa: E402
from pdsupervisor.local.ports import free_port  # noqa: E402
from pdsupervisor.local.procs import kill_tree, marked_processes  # noqa: E402
from pdsupervisor.store.embedded import etcd_binary  # noqa: E402
from pdsupervisor.store.etcd import Store  # noqa: E402


def etcd_writes(endpoint: str) -> float:
    """etcd_mvcc_put_total + etcd_mvcc_txn_total + etcd_mvcc_delete_total from /metrics."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    total = 0.0
    for name in ("etcd_mvcc_put_total", "etcd_mvcc_txn_total", "etcd_mvcc_delete_total"):
        m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        total += float(m.group(1)) if m else 0.0
    return total


async def store_call(endpoint: str, cluster: str, fn):
    async with Store([endpoint], cluster) as s:
        return await fn(s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--ttl", type=int, default=10)
    ap.add_argument("--scrape-every", type=float, default=15.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pd-footprint-"))
    cport, pport, rport = free_port(), free_port(), free_port()
    endpoint = f"127.0.0.1:{cport}"
    cluster = "bench"
    # every process started here, and all they start, carries one marker: found at the end
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | {MARKER_ENV: marker}
    try:
        subprocess.Popen(
            etcd_argv(name="bench", data_dir=str(tmp / "etcd"), client_host="127.0.0.1",
                      client_port=cport, peer_port=pport, binary=etcd_binary()),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                etcd_writes(endpoint)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit("etcd did not come up") from exc
                time.sleep(0.1)
        http_port = free_port()
        specs = [
            ProcessSpec(name="sleeper", role="decode", argv=[sys.executable, "-c", "import time; time.sleep(3600)"]),
            ProcessSpec(name="web", role="proxy",
                        argv=[sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1"],
                        readiness=Probe(kind="http", port=http_port, path="/", period_s=1.0)),
        ]
        assignment = NodeAssignment(node="n1", processes=specs)
        asyncio.run(store_call(endpoint, cluster, lambda s: s.put(
            s.keys.assignment("n1"), assignment.model_dump_json().encode())))
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.main", "--name", "n1", "--ip", "127.0.0.1", "--etcd", endpoint,
             "--cluster", cluster, "--listen", f"127.0.0.1:{rport}", "--state-dir", str(tmp / "state"),
             "--ttl", str(args.ttl), "--accelerators", "0", "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "wb"), env=env)

        def ready() -> bool:
            st = asyncio.run(store_call(endpoint, cluster, lambda s: s.get_model(s.keys.node_status("n1"), NodeStatus)))
            return bool(st) and len(st.processes) == 2 and all(p.state.value == "ready" for p in st.processes)

        deadline = time.monotonic() + 30
        while not ready():
            if time.monotonic() > deadline:
                raise SystemExit("children did not become ready; see " + str(tmp / "agent.log"))
            time.sleep(0.2)
        time.sleep(3)  # let the start-up burst settle (status coalescing, first lease refreshes)

        proc = psutil.Process(agent.pid)
        cpu0 = proc.cpu_times()
        w0 = etcd_writes(endpoint)
        t0 = time.monotonic()
        rss: list[int] = []
        scrapes: list[float] = []
        next_scrape = t0
        while time.monotonic() - t0 < args.duration:
            if args.scrape_every > 0 and time.monotonic() >= next_scrape:
                s0 = time.perf_counter()
                urllib.request.urlopen(f"http://127.0.0.1:{rport}/metrics", timeout=5).read()
                scrapes.append(time.perf_counter() - s0)
                next_scrape += args.scrape_every
            rss.append(proc.memory_info().rss)
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        w1 = etcd_writes(endpoint)
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        uss = proc.memory_full_info().uss
        print(f"pd-agent footprint at rest ({elapsed:.0f} s, ttl {args.ttl} s, 2 children, 1 HTTP readiness probe)")
        print(f"  RSS: max {max(rss) / 2**20:.1f} MiB, mean {sum(rss) / len(rss) / 2**20:.1f} MiB "
              f"(USS {uss / 2**20:.1f} MiB)   target <= 60 MB")
        print(f"  CPU: {100 * cpu_s / elapsed:.2f} % of one core   target <= 1 %")
        if scrapes:
            print(f"  GET /metrics: {len(scrapes)} scrapes, {1000 * max(scrapes):.1f} ms at most")
        print(f"  etcd writes from this node: {(w1 - w0) / elapsed:.3f} /s ({w1 - w0:.0f} in {elapsed:.0f} s)"
              "   target <= 1 /s")
    finally:
        for p in marked_processes(MARKER_ENV, marker):
            kill_tree(p.pid)


if __name__ == "__main__":
    main()
