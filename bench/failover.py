"""Failure handling: engine crash, node loss, leader loss, on a real local cluster.

3 agents (`python -m agent.main`, 127.0.0.1..3) through `LocalCluster(ttl=TTL)`, the
demo's layout (1 prefill node + 2 decode nodes, 1 sim-engine each, built-in proxy on node1,
no Mooncake master), private ports (etcd 12379, agents 12400+, proxy 12868). The spec's
`policy.lease_ttl_s` is set to the same TTL. Observed by polling GET /cluster every 50 ms on
an agent that is not the victim. All times wall-clock from the SIGKILL.

  engine   kill -9 a decode engine -> new pid reported in GET /cluster, and -> phase ready
           again. Also: its real respawn (start time of the new pid), so the restart backoff
           (RestartPolicy.initial_backoff_s 1 s, with jitter) is visible apart from reporting.
  node     kill -9 a decode node's agent and its engines -> its processes shown `lost` and
           phase `degraded` (target <= TTL + 1 s). The agent is then restarted and the
           cluster waited back to ready before the next round.
  leader   kill -9 the agent holding /pdsupervisor/<cluster>/leader (GET /cluster "leader")
           -> another agent shown as leader (target <= TTL + 1 s). Restarted, then ready.
  After node/leader rounds: agent restart -> ready again (every member back, no killed pid
  listed); for node loss it also says whether `ready` was shown while the dead engines' pids
  were still listed (status left by the dead agent, before the new one rewrote it).

Usage: python bench/failover.py [--ttl 3] [--repeat 3] [--only engine,node,leader]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _localbench import (
    ApiClient,
    back_to_ready,
    boot,
    create_time,
    finish,
    machine,
    make_spec,
    new_cluster,
    poller,
    row,
    wait_doc,
)

from pdsupervisor.local.procs import kill_tree


async def engine_crash(lc, ttl: int) -> dict[str, float]:
    client = poller(lc, set())
    _, doc = await wait_doc(client, lambda d: d.phase == "ready", 60)
    victim = next(p for p in doc.processes if p.role == "decode")
    old = victim.pid
    t0 = time.time()
    os.kill(old, signal.SIGKILL)
    t_seen, d2 = await wait_doc(client, lambda d: (r := row(d, victim.node, victim.name)) is not None
                                and r.pid not in (None, old), 60)
    new = row(d2, victim.node, victim.name).pid
    respawn = create_time(new)
    t_ready, _ = await wait_doc(client, lambda d: d.phase == "ready"
                                and row(d, victim.node, victim.name).pid == new
                                and row(d, victim.node, victim.name).state == "ready", 60)
    return {"respawned": (respawn or float("nan")) - t0, "new_pid_seen": t_seen - t0, "ready_again": t_ready - t0}


async def node_loss(lc, ttl: int) -> dict[str, float]:
    client = poller(lc, {"node3"})
    _, doc = await wait_doc(client, lambda d: d.phase == "ready", 60)
    leader = doc.leader
    victim = next(a for a in reversed(lc.agents) if a.name != leader and a.name != "node1")
    client = poller(lc, {victim.name})
    proc = psutil.Process(victim.proc.pid)
    dead = {p.pid for p in proc.children(recursive=True) + [proc]}
    t0 = time.time()
    kill_tree(proc.pid)
    victim.proc.wait(5)
    t_lost, _ = await wait_doc(client, lambda d: victim.name not in d.members, ttl + 30)
    t_degraded, _ = await wait_doc(client, lambda d: d.phase == "degraded"
                                   and any(p.node == victim.name and p.state == "lost" for p in d.processes), 30)
    t_restart = time.time()
    lc.start_agent(victim)
    t_back, stale = await back_to_ready(lc, avoid={victim.name}, dead_pids=dead)
    return {"member_gone": t_lost - t0, "degraded": t_degraded - t0,
            "agent_restart_to_ready": t_back - t_restart, "stale_ready": stale}


async def leader_loss(lc, ttl: int) -> dict[str, float]:
    client = poller(lc, set())
    _, doc = await wait_doc(client, lambda d: d.phase == "ready" and d.leader, 60)
    old = doc.leader
    victim = next(a for a in lc.agents if a.name == old)
    client = poller(lc, {old})
    t0 = time.time()
    victim.proc.send_signal(signal.SIGKILL)  # the agent only: its engines (and node1's etcd) keep running
    victim.proc.wait(5)
    t_new, d = await wait_doc(client, lambda d: d.leader not in (None, old), ttl + 30)
    t_restart = time.time()
    lc.start_agent(victim)
    t_back, _ = await back_to_ready(lc, avoid={victim.name})
    return {"new_leader": t_new - t0, "agent_restart_to_ready": t_back - t_restart, "new": d.leader}


async def run(ttl: int, repeat: int, only: list[str]) -> dict[str, list[dict]]:
    lc = new_cluster("failover", 3, ttl)
    spec = make_spec(lc.cluster, ["node1"], ["node2", "node3"], slots=1, load_time=0.5, period_s=0.2, ttl=ttl)
    print(f"3 agents, TTL {ttl} s (agents' --ttl and spec policy.lease_ttl_s), node_loss: wait; state in {lc.root}",
          flush=True)
    out: dict[str, list[dict]] = {k: [] for k in only}
    tests = {"engine": engine_crash, "node": node_loss, "leader": leader_loss}
    try:
        await boot(lc, spec)
        await ApiClient(lc.agents[0].api_url).start(spec, replace=True)
        await back_to_ready(lc)
        await asyncio.sleep(1.0)
        for name in only:
            for i in range(repeat):
                r = await tests[name](lc, ttl)
                out[name].append(r)
                print(f"  {name} #{i + 1}: " + ", ".join(f"{k} {v:.3f} s" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items()), flush=True)
                await asyncio.sleep(1.0)
    finally:
        finish(lc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ttl", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="engine,node,leader")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    out = asyncio.run(run(args.ttl, args.repeat, args.only.split(",")))
    targets = {("node", "degraded"): args.ttl + 1, ("leader", "new_leader"): args.ttl + 1}
    print(f"\nTTL {args.ttl} s; seconds from kill -9")
    print("| failure | measure | median | max | n | target |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rs in out.items():
        for k in rs[0] if rs else []:
            if k in ("new", "stale_ready"):
                if k == "stale_ready":
                    print(f"| {name} | phase `ready` shown while a killed pid was still listed | "
                          f"{sum(r[k] for r in rs)} of {len(rs)} rounds | | | |")
                continue
            xs = [r[k] for r in rs]
            tgt = targets.get((name, k))
            print(f"| {name} | {k} | {statistics.median(xs):.2f} | {max(xs):.2f} | {len(xs)} | "
                  f"{f'≤ {tgt:d}' if tgt else '-'} |")


if __name__ == "__main__":
    main()
