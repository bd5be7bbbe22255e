"""Chaos: what clients of the built-in proxy feel while the control plane is disturbed.

The demo's layout (etc/pdsupervisor/demo.yaml) on private ports (etcd 12379/12380, agents
12400+, prefill 12100+, decode 12200+, proxy 12868, Mooncake master 12501 / metrics 12903):
node1 runs etcd (its agent's child), the Mooncake master (when `mooncake_master` runs here),
2 prefill engines and the proxy; node2 and node3 run 2 decode engines each (one DP group of 4).
etcd speaks TLS with client certificates and the agents' writes want the token, as in the demo.
Lease TTL `--ttl` (default 5 s; the agents' `--ttl` and the spec's `policy.lease_ttl_s`).
Sim engines stream (`--sim-tpot`, default 0.03 s: a 40-token answer lasts ~1.2 s).

Load: `--clients` (8) loops, each sending streaming `POST /v1/completions` (max_tokens 40,
ignore_eos) to the proxy one after another for the whole scenario; a failed request is
followed by a 0.1 s pause (a client that retries at once would only multiply the count).
  ok       200 and the stream ended with `data: [DONE]`, no error event in it
  refused  a non-200 answer, or a connection error before any byte of the body
  broken   200, but the stream ended without `data: [DONE]`, carried an error event, or
           failed after its first byte

Every scenario starts on a cluster that is `ready` (held 2 s); the load runs 2 s first, then
the action, then until the cluster is back. Measured per scenario:
  zero P / zero D   seconds in which the proxy had no instance of the role in rotation:
                    its GET /status polled every 50 ms, instances of the role not `ejected`
                    (the proxy's view: what clients feel, not GET /cluster's). A poll the
                    proxy did not answer counts as zero for both roles.
  back to ready     from the end of the action to GET /cluster phase `ready` with every member
                    present (at the new generation after a spec change, no killed pid listed),
                    taken at the start of a stretch of ready that then held for `--settle` s.

Scenarios (`--only a,b`; all by default):
  agent-ttl     kill -9 node1's agent process only, keep it down TTL + 5 s, restart it. Its
                children are not touched: the agent starts etcd, the master, engines and the
                proxy each in their own session and nothing ties their life to it (no
                PDEATHSIG), so etcd and all of node1's processes keep running; the restarted
                agent adopts them. node1's member key expires meanwhile.
  leader-kill   kill -9 the agent holding the leader key (GET /cluster `leader`), restart it
                after TTL + 2 s (its processes keep running, as above).
  etcd-pause    SIGSTOP the etcd process for TTL + 5 s, then SIGCONT.
  roll-prefill  `start --replace` with a changed prefill env var (CHAOS_ROLL).
  roll-decode   the same with a decode env var.
  bad-rollout   replace with a decode argv[0] that does not exist; once it shows as tried, hold
                10 s, record how many of the old decode pids are still alive, then restore the
                good spec (the action ends there) and wait for ready.
  engine-kill   kill -9 one prefill engine's process tree (an engine of its own, no DP group);
                also: seconds until the proxy took it out of rotation (ejected or gone from
                GET /status).
  rank-kill     kill -9 one rank of the decode DP group: the group is a gang, so every rank
                restarts together (`decode.group_restart: group`); the same columns.
  master-kill   kill -9 the mooncake_master process tree (skipped when it cannot run here).
  node-loss     kill -9 a decode node's agent and all its processes, wait TTL + 5 s, restart
                the agent (its assignment still stands: it starts its engines again).

A cluster that does not come back within `--ready-timeout` is torn down and a fresh one
booted for the next scenario. Every process of the cluster is ended at exit (also on Ctrl-C).

Usage: python bench/chaos.py [--only agent-ttl,engine-kill] [--clients 8] [--ttl 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _localbench import (
    DECODE_PORT,
    ETCD_PORT,
    PREFILL_PORT,
    PROXY_PORT,
    back_to_ready,
    boot,
    finish,
    machine,
    new_cluster,
    poller,
    wait_doc,
)

from pdsupervisor.cli.demo import REPO_DEMO_SPEC, master_cannot_run
from pdsupervisor.core.documents import ClusterDocument, SubmitAnswer
from pdsupervisor.local.cluster import LocalAgent, LocalCluster
from pdsupervisor.local.procs import kill_tree, signal_all

MOONCAKE_PORT = 12501
MOONCAKE_METRICS_PORT = 12903
DP_MASTER_PORT = 12940
BASELINE_S = 2.0  # load before the action
BAD_HOLD_S = 10.0  # the bad spec stays this long once tried
SAMPLE_S = 0.05
BODY = {"model": "sim/deepseek-r1-tiny", "prompt": "The quick brown fox jumps over the lazy dog", "stream": True,
        "ignore_eos": True}


def chaos_spec(ttl: int, tpot: float, mooncake: bool) -> dict[str, Any]:
    """The demo's spec with private ports, the TTL, streaming sim engines and the master or not."""
    doc = yaml.safe_load(REPO_DEMO_SPEC.read_text())
    doc["cluster"] = "chaos"
    doc["etcd"] = {**doc.get("etcd", {}), "client_port": ETCD_PORT, "peer_port": ETCD_PORT + 1}
    mc = doc.setdefault("mooncake", {})
    mc["enabled"] = mooncake
    mc["port"] = MOONCAKE_PORT
    args = [str(a) for a in mc.get("extra_args", [])]
    if "-metrics_port" in args:
        args[args.index("-metrics_port") + 1] = str(MOONCAKE_METRICS_PORT)
    mc["extra_args"] = args
    for role, port in (("prefill", PREFILL_PORT), ("decode", DECODE_PORT)):
        doc[role]["base_port"] = port
        doc[role]["argv"] = [*doc[role]["argv"], "--sim-tpot", str(tpot)]
    doc["decode"]["dp_master_port"] = DP_MASTER_PORT
    doc["proxy"]["port"] = PROXY_PORT
    doc["policy"]["lease_ttl_s"] = ttl
    return doc


# ---- load ----------------------------------------------------------------------------------------


@dataclass
class Counts:
    ok: int = 0
    refused: int = 0
    broken: int = 0


def classify(status: int, body: bytes, error: bool) -> str:
    if status != 200 or (error and not body):
        return "refused"
    if error or b"data: [DONE]" not in body:
        return "broken"
    return "broken" if any(error_event(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")) else "ok"


def error_event(data: bytes) -> bool:
    """An in-band error (the proxy's `_abort_stream`, vLLM's): a JSON object with `error`."""
    if b'"error"' not in data:
        return False
    try:
        return "error" in json.loads(data)
    except ValueError:
        return False


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    status, got, error = 0, b"", False
    try:
        async with session.post(url, json=body) as resp:
            status = resp.status
            async for chunk in resp.content.iter_any():
                got += chunk
    except (aiohttp.ClientError, TimeoutError, OSError):
        error = True
    return classify(status, got, error)


async def client_loop(url: str, body: dict[str, Any], stop: asyncio.Event, counts: Counts) -> None:
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            kind = await one_request(session, url, body)
            setattr(counts, kind, getattr(counts, kind) + 1)
            if kind != "ok":
                await asyncio.sleep(0.1)


@dataclass
class ProxyView:
    """GET /status of the proxy every SAMPLE_S: (time, in-rotation endpoints per role or None)."""

    url: str
    samples: list[tuple[float, dict[str, set[str]] | None]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while not stop.is_set():
                t0 = time.time()
                view: dict[str, set[str]] | None = None
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                    async with session.get(self.url + "/status") as resp:
                        status = await resp.json()
                    view = {"prefill": set(), "decode": set()}
                    for inst in status["instances"]:
                        if not inst["ejected"] and inst["role"] in view:
                            view[inst["role"]].add(inst["endpoint"])
                self.samples.append((t0, view))
                await asyncio.sleep(max(0.0, SAMPLE_S - (time.time() - t0)))

    def zero_seconds(self, role: str) -> float:
        total = 0.0
        for (t, view), (t_next, _) in zip(self.samples, self.samples[1:], strict=False):
            if view is None or not view[role]:
                total += t_next - t
        return total

    def unreachable_seconds(self) -> float:
        return sum(t2 - t1 for (t1, v), (t2, _) in zip(self.samples, self.samples[1:], strict=False) if v is None)

    def out_of_rotation(self, endpoint: str, since: float) -> float | None:
        """Seconds from `since` to the first poll that no longer routes to `endpoint`."""
        for t, view in self.samples:
            if t >= since and view is not None and endpoint not in view["prefill"] | view["decode"]:
                return t - since
        return None


# ---- scenarios -------------------------------------------------------------------------------------


@dataclass
class Action:
    """What a scenario did: when its action ended, what to wait for after it, what to say."""

    ended: float
    dead: set[int] = field(default_factory=set)
    generation: int = 0
    avoid: set[str] = field(default_factory=set)  # agents whose API is not to be polled meanwhile
    notes: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None  # engine-kill: the victim, for the proxy's out-of-rotation time
    t0: float = 0.0
    kept: set[int] = field(default_factory=set)  # agent-only kills: the node's pids, to be alive still when back


@dataclass
class Outcome:
    scenario: str
    ok: int = 0
    refused: int = 0
    broken: int = 0
    zero_prefill_s: float = 0.0
    zero_decode_s: float = 0.0
    back_to_ready_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def tree_pids(pid: int) -> set[int]:
    """The pid and its descendants' (nothing when it is gone)."""
    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def node_pids(doc: ClusterDocument, agent: LocalAgent) -> set[int]:
    """The agent's pid and every pid of the node's process trees (engines may have been
    adopted by an earlier agent: then they are not the current agent's children)."""
    roots = [agent.proc.pid] if agent.proc else []
    roots += [p.pid for p in doc.processes if p.node == agent.name and p.pid]
    return set().union(*map(tree_pids, roots))


def kill_agent(agent: LocalAgent) -> None:
    """kill -9 the agent's own process; what it started keeps running."""
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(5)


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ttl: int = args.ttl
        self.mooncake_reason = master_cannot_run("mooncake_master")
        self.spec = chaos_spec(self.ttl, args.tpot, self.mooncake_reason is None)
        self.lc: LocalCluster | None = None
        self.proxy_url = ""
        self.roll = 0
        self.body = {**BODY, "max_tokens": args.max_tokens}
        self.scenarios: dict[str, Callable[[], Awaitable[Action]]] = {
            "agent-ttl": self.agent_ttl, "leader-kill": self.leader_kill, "etcd-pause": self.etcd_pause,
            "roll-prefill": lambda: self.roll_env("prefill"), "roll-decode": lambda: self.roll_env("decode"),
            "bad-rollout": self.bad_rollout, "engine-kill": lambda: self.engine_kill("prefill"),
            "rank-kill": lambda: self.engine_kill("decode"), "master-kill": self.master_kill,
            "node-loss": self.node_loss,
        }

    @property
    def spec_text(self) -> str:
        return yaml.safe_dump(self.spec, sort_keys=False)

    # ---- the cluster --------------------------------------------------------------------------------

    async def fresh_cluster(self) -> None:
        if self.lc is not None:
            finish(self.lc)
        self.lc = new_cluster("chaos", 3, self.ttl, tls=True, token=True)
        print(f"booting 3 agents (state in {self.lc.root}) ...", flush=True)
        await boot(self.lc, self.spec_text)
        answer = await self.lc.client().start(self.spec_text, replace=True)
        await self.ready(generation=answer.generation)

    async def ready(self, generation: int = 0, dead: set[int] = frozenset(), avoid: set[str] = frozenset()) -> float:
        """Wall time the cluster was back at ready (and stayed so for --settle s)."""
        t, _ = await back_to_ready(self.lc, self.args.ready_timeout, avoid=avoid, dead_pids=dead, generation=generation,
                                   settle=self.args.settle)
        _, doc = await wait_doc(poller(self.lc, avoid), lambda d: d.proxy_url is not None, 10)
        self.proxy_url = doc.proxy_url
        return t

    async def doc(self, avoid: set[str] = frozenset()) -> ClusterDocument:
        return (await wait_doc(poller(self.lc, avoid), lambda d: True, 10))[1]

    async def submit(self, spec: dict[str, Any]) -> int:
        return (await self.submit_answer(spec)).generation

    async def submit_answer(self, spec: dict[str, Any]) -> SubmitAnswer:
        """`start --replace`: the answer says beforehand what the change does to serving."""
        return await self.lc.client(len(self.lc.agents) - 1).start(yaml.safe_dump(spec, sort_keys=False), replace=True)

    def agent(self, name: str) -> LocalAgent:
        return next(a for a in self.lc.agents if a.name == name)

    # ---- the actions ----------------------------------------------------------------------------------

    async def agent_down(self, agent: LocalAgent, down_s: float, kill: Callable[[], None]) -> Action:
        doc = await self.doc({agent.name})
        pids = {p.pid for p in doc.processes if p.node == agent.name and p.pid}
        if agent.bootstrap_etcd:  # etcd is no row of GET /cluster
            pids |= {p.pid for p in self.lc.processes() if p.name() == "etcd"}
        t0 = time.time()
        kill()
        await asyncio.sleep(max(0.0, t0 + down_s - time.time()))  # the outage itself
        self.lc.start_agent(agent)
        return Action(ended=time.time(), avoid={agent.name}, t0=t0, kept=pids)

    async def agent_ttl(self) -> Action:
        node1 = self.lc.agents[0]
        return await self.agent_down(node1, self.ttl + 5, lambda: kill_agent(node1))

    async def leader_kill(self) -> Action:
        leader = (await self.doc()).leader
        victim = self.agent(leader)
        action = await self.agent_down(victim, self.ttl + 2, lambda: kill_agent(victim))
        action.notes["leader"] = leader
        return action

    async def etcd_pause(self) -> Action:
        etcd = [p for p in self.lc.processes() if p.name() == "etcd"]
        if len(etcd) != 1:
            raise RuntimeError(f"expected one etcd process of the cluster, found {len(etcd)}")
        t0 = time.time()
        signal_all(etcd, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.ttl + 5)  # the outage itself
        finally:
            signal_all(etcd, signal.SIGCONT)
        return Action(ended=time.time(), t0=t0)

    async def roll_env(self, role: str) -> Action:
        self.roll += 1
        spec = copy.deepcopy(self.spec)
        spec[role].setdefault("env", {})["CHAOS_ROLL"] = str(self.roll)
        t0 = time.time()
        answer = await self.submit_answer(spec)
        self.spec = spec  # the good spec from now on
        return Action(ended=time.time(), generation=answer.generation, t0=t0,
                      notes={"announced": " / ".join(answer.impact) or "nothing"})

    async def bad_rollout(self) -> Action:
        doc = await self.doc()
        old = {p.pid for p in doc.processes if p.role == "decode" and p.pid}
        bad = copy.deepcopy(self.spec)
        bad["decode"]["argv"] = ["/nonexistent/chaos-engine", *bad["decode"]["argv"][1:]]
        t0 = time.time()
        gen = await self.submit(bad)
        notes: dict[str, Any] = {}
        try:
            t_tried, _ = await wait_doc(poller(self.lc), lambda d: d.generation >= gen and (bool(d.problems) or any(
                p.role == "decode" and p.state.split()[0] in ("failed", "backoff", "exited") for p in d.processes)), 60)
            notes["bad spec shown failing after"] = round(t_tried - t0, 1)
        except TimeoutError:
            notes["bad spec shown failing after"] = "never (60 s)"
        await asyncio.sleep(BAD_HOLD_S)  # the bad spec in force, under load
        kept = [pid for pid in old if psutil.pid_exists(pid)]
        notes["old decode pids kept"] = f"{len(kept)}/{len(old)}"
        gen = await self.submit(self.spec)
        return Action(ended=time.time(), generation=gen, notes=notes, t0=t0)

    async def engine_kill(self, role: str) -> Action:
        doc = await self.doc()
        victim = [p for p in doc.processes if p.role == role and p.pid][-1]
        dead = tree_pids(victim.pid)
        t0 = time.time()
        kill_tree(victim.pid)
        return Action(ended=t0, dead=dead, endpoint=victim.endpoint, t0=t0, notes={"victim": f"{victim.node}/{victim.name}"})

    async def master_kill(self) -> Action:
        doc = await self.doc()
        master = next(p for p in doc.processes if p.role == "mooncake-master" and p.pid)
        dead = tree_pids(master.pid)
        t0 = time.time()
        kill_tree(master.pid)
        return Action(ended=t0, dead=dead, t0=t0)

    async def node_loss(self) -> Action:
        doc = await self.doc()
        name = next(n for n in reversed(doc.placement["decode"]) if n != doc.leader)
        victim = self.agent(name)
        dead = node_pids(doc, victim)

        def kill() -> None:
            procs = [psutil.Process(pid) for pid in dead if psutil.pid_exists(pid)]
            signal_all(procs, signal.SIGKILL)
            psutil.wait_procs(procs, timeout=5)
            victim.proc.wait(5)

        action = await self.agent_down(victim, self.ttl + 5, kill)
        action.dead, action.kept = dead, set()
        action.notes["node"] = name
        return action

    # ---- one scenario ---------------------------------------------------------------------------------

    async def run(self, name: str) -> Outcome:
        out = Outcome(name)
        if name == "master-kill" and self.mooncake_reason is not None:
            out.skipped = f"no Mooncake master: {self.mooncake_reason}"
            return out
        try:
            await self.ready()
        except TimeoutError:
            print("  the cluster is not ready: booting a fresh one", flush=True)
            await self.fresh_cluster()
        stop = asyncio.Event()
        counts = Counts()
        view = ProxyView(self.proxy_url)
        url = self.proxy_url + "/v1/completions"
        tasks = [asyncio.create_task(view.run(stop))]
        tasks += [asyncio.create_task(client_loop(url, self.body, stop, counts)) for _ in range(self.args.clients)]
        try:
            await asyncio.sleep(BASELINE_S)  # load on the ready cluster first
            action = await self.scenarios[name]()
            try:
                t_ready = await self.ready(generation=action.generation, dead=action.dead, avoid=action.avoid)
                out.back_to_ready_s = max(0.0, t_ready - action.ended)
                if action.kept:
                    alive = [pid for pid in action.kept if psutil.pid_exists(pid)]
                    out.notes["node's pids kept"] = f"{len(alive)}/{len(action.kept)}"
            except TimeoutError:
                out.notes["back to ready"] = f"not within {self.args.ready_timeout:g} s"
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=70)
        out.ok, out.refused, out.broken = counts.ok, counts.refused, counts.broken
        out.zero_prefill_s = round(view.zero_seconds("prefill"), 2)
        out.zero_decode_s = round(view.zero_seconds("decode"), 2)
        if (gone := view.unreachable_seconds()) > 0:
            out.notes["proxy unreachable s"] = round(gone, 2)
        if action.endpoint:
            dt = view.out_of_rotation(action.endpoint, action.t0)
            out.notes["proxy stopped routing to it after s"] = round(dt, 2) if dt is not None else "never"
        out.notes.update(action.notes)
        if out.back_to_ready_s is not None:
            out.back_to_ready_s = round(out.back_to_ready_s, 2)
        return out


def fmt_row(o: Outcome) -> str:
    if o.skipped:
        return f"| {o.scenario} | - | - | - | - | - | - | skipped: {o.skipped} |"
    ready = f"{o.back_to_ready_s:.1f}" if o.back_to_ready_s is not None else "timeout"
    notes = "; ".join(f"{k}: {v}" for k, v in o.notes.items())
    return (f"| {o.scenario} | {o.ok} | {o.refused} | {o.broken} | {o.zero_prefill_s:.2f} | {o.zero_decode_s:.2f} | "
            f"{ready} | {notes} |")


HEADER = ("| scenario | ok | refused | broken | zero P (s) | zero D (s) | back to ready (s) | notes |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|")


async def main_async(args: argparse.Namespace, names: list[str]) -> list[Outcome]:
    me = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)  # cleanup as on Ctrl-C
    chaos = Chaos(args)
    if chaos.mooncake_reason:
        print(f"running without a Mooncake master: {chaos.mooncake_reason}", flush=True)
    outcomes: list[Outcome] = []
    try:
        await chaos.fresh_cluster()
        print(HEADER, flush=True)
        for name in names:
            try:
                outcome = await chaos.run(name)
            except Exception as exc:  # one scenario failing is reported; the others still run
                outcome = Outcome(name, skipped=f"error: {exc!r}"[:300])
            outcomes.append(outcome)
            print(fmt_row(outcome), flush=True)
    finally:
        if chaos.lc is not None:
            finish(chaos.lc)
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ttl", type=int, default=5, help="lease TTL, s (agents and spec)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming client loops")
    ap.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    ap.add_argument("--tpot", type=float, default=0.03, help="sim engines' seconds per output token")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds ready must hold to count as back")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    every = ["agent-ttl", "leader-kill", "etcd-pause", "roll-prefill", "roll-decode", "bad-rollout", "engine-kill", "rank-kill",
             "master-kill", "node-loss"]
    names = [n for n in args.only.split(",") if n] or every
    if unknown := [n for n in names if n not in every]:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(every)}")
    print(f"machine: {machine()}")
    print(f"TTL {args.ttl} s, {args.clients} clients, max_tokens {args.max_tokens}, tpot {args.tpot} s", flush=True)
    t0 = time.monotonic()
    try:
        outcomes = asyncio.run(main_async(args, names))  # Ctrl-C or SIGTERM cancels it: its finally ends the cluster
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted (the cluster's processes are ended)")
    wall = time.monotonic() - t0
    print(f"\nTTL {args.ttl} s, {args.clients} streaming clients, wall time {wall:.0f} s; zero P/D: seconds the proxy "
          "had no prefill/decode instance in rotation (its GET /status every 50 ms)")
    print(HEADER)
    for o in outcomes:
        print(fmt_row(o))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "ttl": args.ttl, "clients": args.clients, "wall_s": wall,
                                         "results": [asdict(o) for o in outcomes]}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
