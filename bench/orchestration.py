"""Orchestration overhead: `POST /cluster/start` -> phase `ready`, minus the engines' own start-up.

Runs real agents (`python -m agent.main`, one process per node, on 127.0.0.1..N) through
`LocalCluster`, with simulated engines (`pdsupervisor.simengine`, `--sim-load-time`),
the built-in proxy and no Mooncake master. All on loopback, private ports (etcd 12379,
agents 12400+, engines 12100/12200, proxy 12868).

Definitions (all wall-clock, `time.time()`):
  total       submit (just before POST /cluster/start) -> first GET /cluster showing `ready`
  own load    per engine, its process start (psutil create_time of the pid GET /cluster
              reports) -> its "listening on" log line (the sim-engine binds only after its
              simulated load; Python start-up + imports + --sim-load-time + bind). The slowest
              engine's own load is subtracted: overhead = total - max(own load).
  Also measured: a lone sim-engine, Popen -> /health 200, N times (no agent involved).
Breakdown (events log timestamps + 50 ms polling of GET /cluster, on the last agent):
  submit -> engines assigned     "prefill/decode assigned" events
  assigned -> last engine spawned  max create_time of engine pids
  spawned -> last engine listening   (= own load, minus what overlaps)
  listening -> all engines ready in GET /cluster   (probe period + status write debounce)
  engines ready -> proxy assigned  "proxy released" event
  proxy assigned -> proxy spawned -> proxy listening (its log line) -> ready seen

Usage: python bench/orchestration.py [--nodes 3] [--nodes 32] [--runs 3] [--load-time 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _localbench import (
    ApiClient,
    boot,
    create_time,
    engine_listen_times,
    finish,
    get_cluster,
    machine,
    make_spec,
    new_cluster,
    standalone_engine_startup,
    summary,
    wait_doc,
)

from pdsupervisor.core.planner import ENGINE_ROLES


def split_nodes(n: int) -> tuple[list[str], list[str]]:
    """3 nodes: 1 prefill + 2 decode (the demo); otherwise 1/4 prefill, the rest decode."""
    names = [f"node{i + 1}" for i in range(n)]
    n_prefill = 1 if n <= 3 else max(1, n // 4)
    return names[:n_prefill], names[n_prefill:]


async def one_start(lc, spec_text: str, poll: ApiClient) -> dict[str, Any]:
    """Submit, follow to ready, and return the timeline (wall times)."""
    submit_client = ApiClient(lc.agents[0].api_url, timeout_s=10)
    marks: dict[str, float] = {}
    pids: dict[tuple[str, str], int] = {}
    t_submit = time.time()
    await submit_client.start(spec_text, replace=True)
    marks["submit"] = t_submit
    deadline = time.monotonic() + 180
    while True:
        doc = await get_cluster(poll)
        now = time.time()
        if doc is not None:
            engines = [p for p in doc.processes if p.role in ENGINE_ROLES]
            for p in doc.processes:
                if p.pid:
                    pids[(p.node, p.name)] = p.pid
            if engines and all(p.pid for p in engines) and "engines_reported" not in marks:
                marks["engines_reported"] = now
            if engines and all(p.state == "ready" for p in engines) and "engines_ready_seen" not in marks:
                marks["engines_ready_seen"] = now
            if doc.phase == "ready":
                marks["ready"] = now
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after 180 s: {doc and doc.phase}")
        await asyncio.sleep(0.05)
    events = [e for e in await poll.events(limit=500) if e.ts >= t_submit - 0.01]
    assigned = [e.ts for e in events if e.kind == "assign" and getattr(e, "role", None) in ENGINE_ROLES]
    proxy = [e.ts for e in events if e.kind == "assign" and getattr(e, "role", None) == "proxy"]
    marks["engines_assigned"] = max(assigned) if assigned else float("nan")
    marks["proxy_assigned"] = proxy[0] if proxy else float("nan")

    own: list[float] = []
    spawned: list[float] = []
    listening: list[float] = []
    for p in doc.processes:
        if p.role not in ENGINE_ROLES:
            continue
        ct = create_time(p.pid)
        agent = next(a for a in lc.agents if a.name == p.node)
        listens = [t for t in engine_listen_times(agent.state_dir / "logs" / f"{p.name}.log") if ct and t >= ct - 0.01]
        if ct is None or not listens:
            continue
        spawned.append(ct)
        listening.append(listens[0])
        own.append(listens[0] - ct)
    marks["engines_spawned"] = max(spawned) if spawned else float("nan")
    marks["engines_listening"] = max(listening) if listening else float("nan")
    proxy_rows = [p for p in doc.processes if p.role == "proxy"]
    marks["proxy_spawned"] = create_time(proxy_rows[0].pid) if proxy_rows else float("nan")
    if proxy_rows:
        agent = next(a for a in lc.agents if a.name == proxy_rows[0].node)
        pl = [t for t in engine_listen_times(agent.state_dir / "logs" / "proxy.log") if t >= marks["proxy_spawned"] - 0.01]
        marks["proxy_listening"] = pl[0] if pl else float("nan")
    total = marks["ready"] - t_submit
    return {"marks": marks, "own": own, "total": total, "overhead": total - max(own) if own else float("nan"),
            "n_engines": len(own)}


async def stop_cluster(lc, poll: ApiClient) -> None:
    await ApiClient(lc.agents[0].api_url).stop()
    await wait_doc(poll, lambda d: d.phase == "stopped", 120, interval=0.2)


def show_run(r: dict[str, Any]) -> None:
    m = r["marks"]
    t0 = m["submit"]
    steps = [
        ("submit -> engines assigned (event)", "submit", "engines_assigned"),
        ("engines assigned -> last engine spawned (create_time)", "engines_assigned", "engines_spawned"),
        ("last engine spawned -> last engine listening (log)", "engines_spawned", "engines_listening"),
        ("last engine listening -> all engines ready in GET /cluster", "engines_listening", "engines_ready_seen"),
        ("engines ready seen -> proxy assigned (event)", "engines_ready_seen", "proxy_assigned"),
        ("proxy assigned -> proxy spawned (create_time)", "proxy_assigned", "proxy_spawned"),
        ("proxy spawned -> proxy listening (log)", "proxy_spawned", "proxy_listening"),
        ("proxy listening -> phase ready seen", "proxy_listening", "ready"),
    ]
    for label, a, b in steps:
        print(f"    {label:<60} {m[b] - m[a]:+7.3f} s   (at {m[b] - t0:6.3f})")
    print(f"    all engine pids first reported at {m['engines_reported'] - t0:.3f}; "
          f"engines' own load: min {min(r['own']):.3f} max {max(r['own']):.3f} s over {r['n_engines']} engines")
    print(f"    total {r['total']:.3f} s, overhead (total - slowest own load) {r['overhead']:.3f} s", flush=True)


async def bench(nodes: int, runs: int, load_time: float, period: float, ttl: int, slots: int) -> dict[str, Any]:
    prefill, decode = split_nodes(nodes)
    lc = new_cluster(f"orch{nodes}", nodes, ttl)
    spec_text = make_spec(lc.cluster, prefill, decode, slots=slots, load_time=load_time, period_s=period, ttl=ttl)
    print(f"\n== {nodes} agents ({len(prefill)} prefill + {len(decode)} decode nodes, {slots} engine(s) per node, "
          f"sim-load-time {load_time} s, readiness period {period} s, TTL {ttl} s); state in {lc.root}", flush=True)
    results = []
    try:
        took = await boot(lc, spec_text)
        print(f"  agents registered in {took:.1f} s", flush=True)
        poll = ApiClient(lc.agents[-1].api_url, timeout_s=10)
        for i in range(runs):
            r = await one_start(lc, spec_text, poll)
            print(f"  run {i + 1}:")
            show_run(r)
            results.append(r)
            await stop_cluster(lc, poll)
            await asyncio.sleep(1.0)
    finally:
        finish(lc)
    return {"nodes": nodes, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, action="append", help="agents per cluster (repeatable; default 3 and 32)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load-time", type=float, default=0.5, help="--sim-load-time of every engine")
    ap.add_argument("--period", type=float, default=0.2, help="readiness probe period (the demo's 0.2 s)")
    ap.add_argument("--slots", type=int, default=1, help="engines per node (TP 1)")
    ap.add_argument("--ttl", type=int, default=5)
    ap.add_argument("--standalone-runs", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    alone = standalone_engine_startup(args.standalone_runs, args.load_time)
    print(f"lone sim-engine, Popen -> /health 200 (sim-load-time {args.load_time}): {summary(alone)}", flush=True)
    out = [asyncio.run(bench(n, args.runs, args.load_time, args.period, args.ttl, args.slots))
           for n in (args.nodes or [3, 32])]
    print("\n| nodes | engines | runs | total median (max) s | slowest own load median s | overhead median (max) s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for o in out:
        rs = o["results"]
        tot = [r["total"] for r in rs]
        own = [max(r["own"]) for r in rs]
        ov = [r["overhead"] for r in rs]
        print(f"| {o['nodes']} | {rs[0]['n_engines']} | {len(rs)} | {statistics.median(tot):.2f} ({max(tot):.2f}) | "
              f"{statistics.median(own):.2f} | {statistics.median(ov):.2f} ({max(ov):.2f}) |")
    keys = ["engines_assigned", "engines_spawned", "engines_listening", "engines_ready_seen", "proxy_assigned",
            "proxy_spawned", "proxy_listening", "ready"]
    print("\nbreakdown, median over runs, seconds between consecutive marks:")
    print("| nodes | submit→engines assigned | →last engine spawned | →last listening | →engines ready seen "
          "| →proxy assigned | →proxy spawned | →proxy listening | →ready |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for o in out:
        cols = []
        prev = "submit"
        for k in keys:
            cols.append(statistics.median([r["marks"][k] - r["marks"][prev] for r in o["results"]]))
            prev = k
        print(f"| {o['nodes']} | " + " | ".join(f"{c:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
