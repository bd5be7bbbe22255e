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

  mooncake-master  (needs the real mooncake_master and mooncake package) its own cluster: the
           sim engines hand KV over through the real Mooncake Store (1 prefill + 2 decode
           nodes, one engine each, decode DP independent), a steady load through the proxy (4 clients); kill -9 the
           leader master. Modes: ha-oplog (`mooncake.replicas` 2, masters on node1 and node2
           electing in an etcd of Mooncake's own on 127.0.0.1:12479, `ha_oplog`), ha (the same
           without the OpLog), single (the one master, for comparison).
           -> requests failed, engines restarted (pids changed), time until requests succeed
           again for good (the first success after the last failure), the master's restart.

Usage: python bench/failover.py [--ttl 3] [--repeat 3] [--only engine,node,leader,mooncake-master]
                                [--mooncake-modes ha-oplog,ha,single]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
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

from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.local.cluster import LocalCluster
from pdsupervisor.local.procs import kill_tree
from pdsupervisor.store.embedded import etcd_binary


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


# Its own private ports (BENCH_PORTS), apart from the other scenarios': both can run at once.
MC_ETCD_PORT, MC_PORT, MC_METRICS_PORT = 12479, 12501, 12503
MC_CP_ETCD, MC_API, MC_PREFILL, MC_DECODE, MC_DP, MC_PROXY = 12579, 12510, 12610, 12620, 12630, 12668


MOONCAKE_MODES = {"ha-oplog": (2, True), "ha": (2, False), "single": (1, False)}  # replicas, mooncake.ha_oplog


def _mooncake_spec(cluster: str, ttl: int, replicas: int, oplog: bool) -> str:
    """The failover layout with real Mooncake KV hand-offs and `replicas` masters."""
    doc = yaml.safe_load(make_spec(cluster, ["node1"], ["node2", "node3"], slots=1, load_time=0.5, period_s=0.2,
                                   ttl=ttl))
    doc["etcd"].update(client_port=MC_CP_ETCD, peer_port=MC_CP_ETCD + 1)
    doc["prefill"]["base_port"], doc["decode"]["base_port"] = MC_PREFILL, MC_DECODE
    doc["decode"]["dp_master_port"], doc["proxy"]["port"] = MC_DP, MC_PROXY
    doc["decode"]["dp_mode"] = "independent"  # the DP gang is not what is measured here
    doc["engine_env"] = {"PDSIM_MOONCAKE_SEGMENT_CAP": "32MiB", "PDSIM_MOONCAKE_BUFFER_CAP": "2MiB",
                         "PDSIM_KV_TIMEOUT": "2", "MC_TCP_BIND_ADDRESS": "{node_ip}"}
    doc["mooncake"] = {"protocol": "tcp", "gc_args": [], "port": MC_PORT, "max_threads": 4,
                       "extra_args": ["-rpc_thread_num", "2"]}
    if replicas > 1:
        doc["mooncake"].update(replicas=replicas, ha_etcd=[f"127.0.0.1:{MC_ETCD_PORT}"], metrics_port=MC_METRICS_PORT,
                               ha_oplog=oplog)
    else:
        doc["mooncake"]["extra_args"] += ["-rpc_address", "{node_ip}", "-metrics_host", "{node_ip}",
                                          "-metrics_port", str(MC_METRICS_PORT)]
    for role in ("prefill", "decode"):
        # 16 KiB of KV per request: the objects put in a KV lease (10 s) stay well within the
        # 32 MiB segments (at 256 KiB they filled them, and hand-offs failed with no failover)
        doc[role]["argv"] += ["--sim-kv-transfer", "mooncake", "--max-num-seqs", "32", "--sim-kv-bytes-per-token", "256"]
    return yaml.safe_dump(doc, sort_keys=False)


def _mooncake_etcd(root: Path) -> subprocess.Popen[bytes]:
    """Mooncake's own etcd (plain, loopback): it holds the masters' election and OpLog only."""
    argv = etcd_argv(name="mooncake", data_dir=str(root / "mooncake-etcd"), client_host="127.0.0.1",
                     client_port=MC_ETCD_PORT, peer_port=MC_ETCD_PORT + 1, binary=etcd_binary())
    with open(root / "mooncake-etcd.log", "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def _load(url: str, log: list[tuple[float, float, int]], stop: asyncio.Event, clients: int = 4) -> None:
    """`clients` loops of short completions through the proxy: (start, end, status) each."""
    async def one(session: aiohttp.ClientSession, c: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.time()
            try:
                async with session.post(url + "/v1/completions", json={"prompt": f"client {c} request {i} " * 16,
                                                                       "max_tokens": 2}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            log.append((t0, time.time(), status))
            if status != 200:
                await asyncio.sleep(0.1)  # an error comes back at once: do not spin

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        await asyncio.gather(*(one(session, c) for c in range(clients)))


async def _master_health(node_ip: str) -> dict:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s, \
                s.get(f"http://{node_ip}:{MC_METRICS_PORT}/health") as r:
            return await r.json(content_type=None) if r.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def mooncake_master_loss(lc, ttl: int, replicas: int) -> dict[str, float]:
    """kill -9 the leader master under load; the requests' outcome and the engines' pids."""
    client = poller(lc, set())
    _, doc = await wait_doc(client, lambda d: d.phase == "ready", 90)
    ips = {a.name: a.ip for a in lc.agents}
    masters = [p for p in doc.processes if p.role == "mooncake-master"]
    if replicas > 1:
        leader = None
        for _ in range(100):
            serving = [m for m in masters if (await _master_health(ips[m.node])).get("service_ready")]
            if serving:
                leader = serving[0]
                break
            await asyncio.sleep(0.2)
        assert leader is not None, "no master says it is serving"
    else:
        (leader,) = masters
    engine_pids = {(p.node, p.name): p.pid for p in doc.processes if p.role in ("prefill", "decode")}
    log: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(f"http://127.0.0.1:{MC_PROXY}", log, stop))  # the proxy is on node1
    try:
        t_load = time.time()  # a steady stream before the kill: 3 s of successes only (up to 90 s)
        while time.time() - t_load < 90:
            await asyncio.sleep(0.2)
            recent = [x for x in log if x[0] >= time.time() - 3]
            if time.time() - t_load >= 3 and recent and all(x[2] == 200 for x in recent):
                break
        t_kill = time.time()
        before = [s for t0, _, s in log if t0 >= t_kill - 3]
        kill_tree(leader.pid)
        t_master, _ = await wait_doc(client, lambda d: (r := row(d, leader.node, leader.name)) is not None
                                     and r.pid not in (None, leader.pid) and r.state == "ready", 60)
        deadline = time.time() + 120

        def settled() -> bool:  # 5 s of successes only, after something failed (or 30 s of none)
            after = [x for x in log if x[0] >= t_kill]
            fails = [x for x in after if x[2] != 200]
            last = max((x[1] for x in fails), default=t_kill)
            oks = [x for x in after if x[2] == 200 and x[0] >= last]
            return bool(oks) and time.time() - max(last, t_kill + (0 if fails else 25)) >= 5

        while not settled() and time.time() < deadline:
            await asyncio.sleep(0.2)
        _, doc2 = await wait_doc(client, lambda d: d.phase == "ready", 90)
    finally:
        stop.set()
        await load
    after = [x for x in log if x[0] >= t_kill]
    fails = [x for x in after if x[2] != 200]
    last_fail = max((x[0] for x in fails), default=t_kill)
    ok_again = min((x[1] for x in after if x[2] == 200 and x[0] >= last_fail), default=float("nan"))
    restarted = sum(1 for p in doc2.processes if (p.node, p.name) in engine_pids and p.pid != engine_pids[p.node, p.name])
    return {"failed_before_kill": float(sum(s != 200 for s in before)), "requests": float(len(after)),
            "failed": float(len(fails)), "engines_restarted": float(restarted),
            "first_failure": min((x[1] for x in fails), default=t_kill) - t_kill,
            "ok_again": ok_again - t_kill, "master_back": t_master - t_kill}


async def run_mooncake(ttl: int, repeat: int, mode: str) -> list[dict]:
    """Its own cluster (the spec differs): `repeat` leader kills in `mode` (MOONCAKE_MODES)."""
    replicas, oplog = MOONCAKE_MODES[mode]
    lc = LocalCluster(cluster=f"mc-master-{mode}", root=Path(tempfile.mkdtemp(prefix="pdbench-mc-master-")),
                      nodes=3, etcd_port=MC_CP_ETCD, api_base_port=MC_API, ttl=ttl)
    spec = _mooncake_spec(lc.cluster, ttl, replicas, oplog)
    mc_etcd = _mooncake_etcd(lc.root) if replicas > 1 else None
    print(f"mooncake-master, {mode} (replicas {replicas}, ha_oplog {oplog}): 3 agents, TTL {ttl} s; "
          f"state in {lc.root}", flush=True)
    out: list[dict] = []
    try:
        await boot(lc, spec)
        await ApiClient(lc.agents[0].api_url).start(spec, replace=True)
        await back_to_ready(lc, timeout=180)
        await asyncio.sleep(1.0)
        for i in range(repeat):
            r = await mooncake_master_loss(lc, ttl, replicas)
            out.append(r)
            print(f"  mooncake-master ({mode}) #{i + 1}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
            await back_to_ready(lc, timeout=180)
            await asyncio.sleep(2.0)
    finally:
        finish(lc)
        if mc_etcd is not None:
            kill_tree(mc_etcd.pid)
            mc_etcd.wait(5)
    return out


async def run(ttl: int, repeat: int, only: list[str], etcd_members: int) -> dict[str, list[dict]]:
    if not only:
        return {}
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
    ap.add_argument("--mooncake-modes", default=",".join(MOONCAKE_MODES),
                    help="for mooncake-master: ha-oplog (2 masters, OpLog), ha (2, no OpLog), single (1)")
    args = ap.parse_args()
    only = args.only.split(",")
    members = args.etcd_members or (3 if any(n.startswith("etcd-") for n in only) else 1)
    print(f"machine: {machine()}")
    out = asyncio.run(run(args.ttl, args.repeat, [k for k in only if k != "mooncake-master"], members))
    if "mooncake-master" in only:
        for mode in args.mooncake_modes.split(","):
            out[f"mooncake-master ({mode})"] = asyncio.run(run_mooncake(args.ttl, args.repeat, mode))
    targets = {("node", "degraded"): args.ttl + 1, ("leader", "new_leader"): args.ttl + 1}
    print(f"\nTTL {args.ttl} s; seconds from kill -9")
    print("| failure | measure | median | max | n | target |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rs in out.items():
        for k in rs[0] if rs else []:
            if k == "failed_before_kill":
                print(f"| {name} | requests failed in the 3 s before the kill (steady: 0) | "
                      f"{', '.join(str(int(r[k])) for r in rs)} | | | |")
                continue
            if k in ("new", "stale_ready", "member", "node"):
                if k == "stale_ready":
                    print(f"| {name} | phase `ready` shown while a killed pid was still listed | "
                          f"{sum(r[k] for r in rs)} of {len(rs)} rounds | | | |")
                continue
            xs = [r[k] for r in rs if r[k] == r[k]]  # nan: not within the round's deadline
            tgt = targets.get((name, k))
            never = f" ({len(rs) - len(xs)} of {len(rs)}: not within 120 s)" if len(xs) < len(rs) else ""
            if not xs:
                print(f"| {name} | {k} | - | - | 0 | -{never} |")
                continue
            print(f"| {name} | {k} | {statistics.median(xs):.2f} | {max(xs):.2f} | {len(xs)} | "
                  f"{f'≤ {tgt:d}' if tgt else '-'}{never} |")


if __name__ == "__main__":
    main()
