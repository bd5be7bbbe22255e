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

With an etcd of 3 members (one per agent, `LocalCluster(etcd_members=3)`, the default when an
etcd-* scenario is asked for; every agent and the spec list every member):

  etcd-member       kill -9 the etcd member of a node that is neither the raft leader nor
                    node1, and at once node1's prefill engine: its exit shown in GET /cluster
                    and its new pid shown after the new process started (both through etcd;
                    the restart backoff left out), against the same engine kill just before
                    with every member up (control_*: no gap expected); the longest stretch
                    without a GET /cluster answer; the member back (its agent restarts it).
  etcd-leader-node  kill -9 the node hosting the etcd raft leader (its agent, etcd member and
                    engines): etcd's new leader (GET /etcd on another agent), the longest stretch
                    without a GET /cluster answer from another agent, the node shown lost; then
                    its agent restarted: its member back from its data dir (3/3), ready again.

Usage: python bench/failover.py [--ttl 3] [--repeat 3] [--only engine,node,leader,etcd-member,etcd-leader-node]
       [--etcd-members 1|3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _localbench import (
    ApiClient,
    ApiError,
    back_to_ready,
    boot,
    create_time,
    finish,
    get_cluster,
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


class ApiWatch:
    """GET /cluster polled every 50 ms in the background: when it answered, to find the longest
    stretch without an answer (a request that hangs counts until it fails)."""

    def __init__(self, client) -> None:
        self.client, self.ok = client, []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if await get_cluster(self.client) is not None:
                self.ok.append(time.time())
            await asyncio.sleep(0.05)

    async def longest_gap(self, t0: float) -> float:
        """Seconds of the longest stretch without an answer since `t0` (until now); stops polling."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        times = [t0] + [t for t in self.ok if t > t0] + [time.time()]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


async def etcd_doc(lc, index: int):
    with contextlib.suppress(TimeoutError, OSError, ApiError):
        return await lc.client(index, timeout_s=3).etcd()
    return None


async def wait_etcd(lc, index: int, pred, timeout: float):
    """Poll GET /etcd on agent `index` until pred(doc); (wall time, doc)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = await etcd_doc(lc, index)
        if doc is not None and pred(doc):
            return time.time(), doc
        if time.monotonic() > deadline:
            raise TimeoutError(f"GET /etcd: condition not met in {timeout}s; last {doc and doc.summary()}")
        await asyncio.sleep(0.05)


def _all_up(doc) -> bool:
    return doc.up == len(doc.members) and doc.leader is not None


async def _prefill_restart(client, t0: float) -> dict[str, float]:
    """kill -9 node1's prefill engine (no DP group: restarted alone) and time what goes through
    etcd, apart from the restart backoff (which doubles per restart): seconds from `t0` until
    the exit is shown in GET /cluster, and from the new process's start until its pid is shown."""
    _, doc = await wait_doc(client, lambda d: d.phase == "ready", 60)
    engine = next(p for p in doc.processes if p.role == "prefill")
    os.kill(engine.pid, signal.SIGKILL)
    t_exit, _ = await wait_doc(client, lambda d: (r := row(d, engine.node, engine.name)) is not None
                               and r.pid != engine.pid, 60)
    t_seen, d2 = await wait_doc(client, lambda d: (r := row(d, engine.node, engine.name)) is not None
                                and r.pid not in (None, engine.pid), 60)
    new = row(d2, engine.node, engine.name).pid
    respawn = create_time(new) or float("nan")
    await wait_doc(client, lambda d: d.phase == "ready" and row(d, engine.node, engine.name).pid == new
                   and row(d, engine.node, engine.name).state == "ready", 60)
    return {"exit_shown": t_exit - t0, "new_pid_shown_after_start": t_seen - respawn}


async def etcd_member_loss(lc, ttl: int) -> dict[str, float]:
    client = poller(lc, set())
    _, edoc = await wait_etcd(lc, 0, _all_up, 30)
    victim_i = max(i for i, a in enumerate(lc.agents) if a.bootstrap_etcd and a.name not in (edoc.leader, "node1"))
    victim = lc.agents[victim_i]
    client = poller(lc, {victim.name})
    control = await _prefill_restart(client, time.time())  # the same failure, etcd whole
    await asyncio.sleep(1.0)
    etcd_pid = (await lc.client(victim_i).status())["bootstrap"][0]["pid"]
    watch = ApiWatch(client)
    await asyncio.sleep(0.5)
    t0 = time.time()
    os.kill(etcd_pid, signal.SIGKILL)
    lost = await _prefill_restart(client, t0)  # a new failure at once: handled as without the loss?
    t_back, _ = await wait_etcd(lc, 0, lambda e: _all_up(e) and all(
        m.up for m in e.members if m.name == victim.name), 60)
    gap = await watch.longest_gap(t0)
    return {**{f"control_{k}": v for k, v in control.items()}, **{f"member_lost_{k}": v for k, v in lost.items()},
            "cluster_api_longest_gap": gap, "member_back_3of3": t_back - t0, "member": victim.name}


async def etcd_leader_node_loss(lc, ttl: int) -> dict[str, float]:
    client = poller(lc, set())
    await wait_doc(client, lambda d: d.phase == "ready", 60)
    _, edoc = await wait_etcd(lc, 0, _all_up, 30)
    victim = next(a for a in lc.agents if a.name == edoc.leader)
    other = max(i for i, a in enumerate(lc.agents) if a.name != victim.name)
    client = poller(lc, {victim.name})
    watch = ApiWatch(client)
    proc = psutil.Process(victim.proc.pid)
    dead = {p.pid for p in proc.children(recursive=True) + [proc]}
    await asyncio.sleep(0.5)
    t0 = time.time()
    kill_tree(proc.pid)  # the node: its agent, etcd member and engines
    victim.proc.wait(5)
    t_leader, e2 = await wait_etcd(lc, other, lambda e: e.leader not in (None, victim.name), 60)
    t_lost, _ = await wait_doc(client, lambda d: victim.name not in d.members, ttl + 30)
    gap = await watch.longest_gap(t0)
    t_restart = time.time()
    lc.start_agent(victim)
    t_member, _ = await wait_etcd(lc, other, _all_up, 60)
    t_back, _ = await back_to_ready(lc, avoid={victim.name}, dead_pids=dead)
    return {"etcd_new_leader": t_leader - t0, "cluster_api_longest_gap": gap, "node_shown_lost": t_lost - t0,
            "restart_member_back_3of3": t_member - t_restart, "restart_to_ready": t_back - t_restart,
            "node": victim.name, "new": e2.leader}


async def run(ttl: int, repeat: int, only: list[str], etcd_members: int) -> dict[str, list[dict]]:
    lc = new_cluster("failover", 3, ttl, etcd_members=etcd_members)
    spec = make_spec(lc.cluster, ["node1"], ["node2", "node3"], slots=1, load_time=0.5, period_s=0.2, ttl=ttl,
                     etcd_members=etcd_members)
    if any(name.startswith("etcd-") for name in only):
        # etcd-member kills the prefill engine twice a round: a short, capped backoff keeps rounds
        # short (what it times leaves the backoff out)
        doc = yaml.safe_load(spec)
        doc["policy"]["restart"] = {"initial_backoff_s": 0.2, "max_backoff_s": 1}
        spec = yaml.safe_dump(doc, sort_keys=False)
    print(f"3 agents, TTL {ttl} s (agents' --ttl and spec policy.lease_ttl_s), node_loss: wait, "
          f"etcd members {etcd_members}; state in {lc.root}", flush=True)
    out: dict[str, list[dict]] = {k: [] for k in only}
    tests = {"engine": engine_crash, "node": node_loss, "leader": leader_loss,
             "etcd-member": etcd_member_loss, "etcd-leader-node": etcd_leader_node_loss}
    if etcd_members < 3 and any(name.startswith("etcd-") for name in only):
        raise SystemExit("the etcd-* scenarios need --etcd-members 3")
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
    ap.add_argument("--etcd-members", type=int, choices=(1, 3), default=None,
                    help="default: 3 when an etcd-* scenario is asked for, else 1")
    args = ap.parse_args()
    only = args.only.split(",")
    members = args.etcd_members or (3 if any(n.startswith("etcd-") for n in only) else 1)
    print(f"machine: {machine()}")
    out = asyncio.run(run(args.ttl, args.repeat, only, members))
    targets = {("node", "degraded"): args.ttl + 1, ("leader", "new_leader"): args.ttl + 1}
    print(f"\nTTL {args.ttl} s; seconds from kill -9")
    print("| failure | measure | median | max | n | target |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rs in out.items():
        for k in rs[0] if rs else []:
            if k in ("new", "stale_ready", "member", "node"):
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
