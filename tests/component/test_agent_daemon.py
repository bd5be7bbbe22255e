"""pd-agent as a real subprocess against a real etcd: reconcile, restart, adoption, outage.

Exit codes in status follow Python's convention: killed by signal N is reported as -N.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import pytest

from agent.process import proctree
from pdsupervisor.core.models import NodeAssignment, NodeStatus, ProcessSpec, RestartPolicy
from pdsupervisor.local.procs import kill_tree
from pdsupervisor.store.etcd import Store, StoreUnavailable
from tests.agent_helpers import SLEEP, TREE, AgentProc, alive, kill_marked, run
from tests.conftest import wait_for

FAST = RestartPolicy(initial_backoff_s=0.3, max_backoff_s=1.0, jitter=0.1, reset_after_s=30)


class View:
    """Synchronous access to the test cluster's keys (one short-lived client per call)."""

    def __init__(self, endpoint: str, cluster: str) -> None:
        self.endpoint, self.cluster = endpoint, cluster

    async def _do(self, fn):
        async with Store([self.endpoint], self.cluster) as s:
            return await fn(s)

    def _try(self, fn):
        try:
            return run(self._do(fn))
        except StoreUnavailable:
            return None

    def assign(self, node: str, *specs: ProcessSpec) -> None:
        a = NodeAssignment(node=node, processes=list(specs))
        run(self._do(lambda s: s.put(s.keys.assignment(node), a.model_dump_json().encode())))

    def unassign(self, node: str) -> None:
        run(self._do(lambda s: s.delete(s.keys.assignment(node))))

    def status(self, node: str) -> dict[str, dict]:
        st: NodeStatus | None = run(self._do(lambda s: s.get_model(s.keys.node_status(node), NodeStatus)))
        return {p.name: p.model_dump(mode="json") for p in st.processes} if st else {}

    def member(self, node: str, strict: bool = False):
        """The node's member key, None if absent; also None when etcd is away, unless `strict`
        (then an etcd hiccup raises instead of passing for an absent key)."""
        def read(s: Store):
            return s.get(s.keys.member(node))
        return run(self._do(read)) if strict else self._try(read)


@pytest.fixture
def env(etcd_server, cluster_name, tmp_path):
    """(view, factory for agents); every process of the test is killed in teardown."""
    started: list[AgentProc] = []
    marker = os.urandom(8).hex()

    def agent(name: str = "n1", etcd: str | None = None, **kw) -> AgentProc:
        a = AgentProc(tmp_path, etcd or etcd_server.endpoint, cluster_name, name=name, marker=marker, **kw)
        started.append(a)
        return a.start()

    try:
        yield View(etcd_server.endpoint, cluster_name), agent
    finally:  # every agent and child goes, even when etcd does not come back
        try:
            etcd_server.resume()
        finally:
            for a in started:
                if a.proc and a.proc.poll() is None:
                    kill_tree(a.proc.pid)
            kill_marked(marker)


def spec(name: str, argv: list[str], **kw) -> ProcessSpec:
    return ProcessSpec(name=name, role="decode", argv=argv, restart=FAST, stop_timeout_s=3, **kw)


def test_assignment_starts_and_removal_stops_whole_tree(env, tmp_path):
    view, agent = env
    a = agent()
    pids_file = tmp_path / "pids"
    view.assign("n1", spec("tree", [sys.executable, "-c", TREE, str(pids_file)]))
    st = wait_for(lambda: view.status("n1").get("tree", {}).get("state") == "ready" and view.status("n1"),
                  timeout=15, what="tree ready in etcd status")
    root = st["tree"]["pid"]
    gc = wait_for(lambda: pids_file.exists() and pids_file.read_text().count(" ") == 1 and pids_file.read_text(),
                  what="grandchildren")
    setsid_gc, group_gc = map(int, gc.split())
    wait_for(lambda: os.getsid(setsid_gc) == setsid_gc, what="grandchild in its own session")
    # registration runs beside the spawn: the status can reach etcd before the member key
    wait_for(lambda: view.member("n1"), what="registered in etcd")
    wait_for(lambda: (a.get("/healthz") or {}).get("registered") is True, what="/healthz registered")
    assert a.local_procs()["tree"]["pid"] == root
    assert "pd-agent: starting tree" in a.get("/logs/tree?tail=5")
    view.unassign("n1")
    wait_for(lambda: not any(alive(p) for p in (root, setsid_gc, group_gc)), timeout=10, what="tree gone")
    wait_for(lambda: view.status("n1") == {}, what="status emptied")
    assert not (a.state_dir / "procs" / "tree.json").exists()


def test_killed_child_restarted_with_backoff_and_exit_code(env):
    view, agent = env
    agent()
    view.assign("n1", spec("s", SLEEP))
    first = wait_for(lambda: view.status("n1").get("s", {}).get("pid"), timeout=15, what="child pid")
    os.kill(first, signal.SIGKILL)
    st = wait_for(lambda: (s := view.status("n1").get("s", {})).get("restarts") == 1 and s.get("pid") and s,
                  timeout=10, what="restart reported")
    assert st["pid"] != first and st["last_exit_code"] == -9
    assert not alive(first)
    # a changed spec (new hash) restarts the process; a generation-only change does not
    second = st["pid"]
    changed = spec("s", SLEEP + ["v2"])
    view.assign("n1", changed)
    third = wait_for(lambda: (p := view.status("n1").get("s", {}).get("pid")) not in (None, second) and p,
                     timeout=10, what="restart on spec change")
    assert not alive(second)
    view.assign("n1", changed.model_copy(update={"generation": 7}))
    wait_for(lambda: view.status("n1").get("s", {}).get("generation") == 7, what="generation reported")
    assert view.status("n1")["s"]["pid"] == third


def test_agent_kill9_member_key_expires_and_restart_adopts(env):
    view, agent = env
    a = agent(ttl=2)
    view.assign("n1", spec("a", SLEEP), spec("b", SLEEP + ["x"]))
    st = wait_for(lambda: len([p for p in view.status("n1").values() if p["state"] == "ready"]) == 2
                  and view.status("n1"), timeout=15, what="both ready")
    pids = {n: p["pid"] for n, p in st.items()}
    wait_for(lambda: view.member("n1"), what="registered")
    a.kill9()
    # strict: an etcd hiccup must fail the test, not pass for an expired key. The bound is
    # loose on purpose (lease expiry is measured by bench/failover.py): the key goes with the
    # lease, not with some later clean-up.
    wait_for(lambda: view.member("n1", strict=True) is None, timeout=a.ttl + 8, what="member key to expire")
    assert all(alive(p) for p in pids.values())
    # restarted while etcd cannot be reached: adopts at once, kills nothing
    from pdsupervisor.local.ports import free_port

    offline = agent(state_dir=a.state_dir, etcd=f"127.0.0.1:{free_port()}")
    local = wait_for(lambda: len(offline.local_procs()) == 2 and offline.local_procs(), what="adopted offline")
    assert {n: p["pid"] for n, p in local.items()} == pids
    assert offline.get("/healthz")["registered"] is False
    assert offline.sigterm() == 0
    assert all(alive(p) for p in pids.values())
    b = agent(state_dir=a.state_dir)  # same node, same state dir
    wait_for(lambda: view.member("n1"), timeout=15, what="re-registered")
    local = wait_for(lambda: len(b.local_procs()) == 2 and b.local_procs(), what="adopted locally")
    assert {n: p["pid"] for n, p in local.items()} == pids
    assert all(p["restarts"] == 0 and p["message"] == "adopted" for p in local.values())
    st = wait_for(lambda: (s := view.status("n1")) and all(p["message"] == "adopted" for p in s.values()) and s,
                  what="adopted status in etcd")
    assert {n: p["pid"] for n, p in st.items()} == pids
    # adopted processes are still stopped by an assignment change
    view.assign("n1", spec("a", SLEEP))
    wait_for(lambda: not alive(pids["b"]), what="adopted b stopped")
    assert alive(pids["a"])


def test_stale_pid_record_is_not_adopted_nor_signalled(env, tmp_path):
    view, agent = env
    stranger = psutil.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        state = tmp_path / "state-n1"
        (state / "procs").mkdir(parents=True)
        s = spec("x", SLEEP + ["ours"])
        # the pid is alive but it is not ours: its start time and command line differ
        rec = {"name": "x", "pid": stranger.pid, "create_time": proctree.started(stranger.pid) - 100,
               "spec_hash": s.spec_hash(), "spec": s.model_dump(mode="json"), "started_at": 0, "restarts": 0,
               "boot_id": proctree.boot_id()}
        (state / "procs" / "x.json").write_text(json.dumps(rec))
        view.assign("n1", s)
        agent(state_dir=state)
        st = wait_for(lambda: view.status("n1").get("x", {}).get("pid"), timeout=15, what="x started")
        assert st != stranger.pid
        view.unassign("n1")
        wait_for(lambda: not alive(st), what="x stopped")
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
    finally:
        kill_tree(stranger.pid)


def test_etcd_outage_longer_than_ttl_leaves_children_and_reregisters(env, etcd_server):
    view, agent = env
    a = agent(ttl=2)
    view.assign("n1", spec("s", SLEEP))
    pid = wait_for(lambda: view.status("n1").get("s", {}).get("state") == "ready" and view.status("n1")["s"]["pid"],
                   timeout=15, what="ready")
    lease_before = wait_for(lambda: view.member("n1"), what="member").lease
    etcd_server.pause()
    try:
        wait_for(lambda: (h := a.get("/healthz")) and h["etcd_reachable"] is False, timeout=10,
                 what="agent notices etcd is away")
        time.sleep(a.ttl + 1)  # the scenario itself: an outage longer than the lease TTL
        assert alive(pid)
        assert a.local_procs()["s"]["pid"] == pid
    finally:
        etcd_server.resume()
    wait_for(lambda: (m := view.member("n1")) and m.lease != lease_before, timeout=15,
             what="re-registered under a new lease")
    # the key is in etcd a moment before the agent has handled its write's answer
    wait_for(lambda: (a.get("/healthz") or {}).get("registered") is True, what="/healthz registered")
    assert view.status("n1")["s"]["pid"] == pid and alive(pid)
    assert a.local_procs()["s"]["restarts"] == 0


def test_sigterm_leaves_children_and_a_restart_keeps_membership(env):
    view, agent = env
    a = agent(ttl=10)
    view.assign("n1", spec("s", SLEEP))
    pid = wait_for(lambda: view.status("n1").get("s", {}).get("pid"), timeout=15, what="started")
    first = wait_for(lambda: view.member("n1"), what="registered")
    assert a.sigterm() == 0
    assert alive(pid)
    # The lease is left to run out: a restart within the TTL is never seen as a lost node.
    assert view.member("n1") is not None
    b = agent(ttl=10, state_dir=a.state_dir)
    wait_for(lambda: (m := view.member("n1")) and m.lease != first.lease, timeout=15, what="re-registered")
    assert b.local_procs()["s"]["pid"] == pid and b.local_procs()["s"]["restarts"] == 0


def test_embedded_etcd_bootstrap_and_adoption(env, tmp_path):
    from pdsupervisor.local.ports import free_port

    _, agent = env
    cport, pport = free_port(), free_port()
    endpoint = f"127.0.0.1:{cport}"
    flags = ["--bootstrap-etcd", "--etcd-client-port", str(cport), "--etcd-peer-port", str(pport)]
    a = agent(name="boot", etcd=endpoint, extra=flags)
    own = View(endpoint, a.cluster)
    first = wait_for(lambda: own.member("boot"), timeout=20, what="registered in its own etcd")
    etcd_pid = a.get("/status")["bootstrap"][0]["pid"]
    a.kill9()
    b = agent(name="boot", etcd=endpoint, extra=flags, state_dir=a.state_dir)
    wait_for(lambda: (s := b.get("/status")) and s["bootstrap"] and s["bootstrap"][0]["pid"], timeout=15,
             what="bootstrap etcd adopted")
    assert b.get("/status")["bootstrap"][0]["pid"] == etcd_pid
    # the killed agent's key outlives it until its lease expires: wait for b's own lease
    wait_for(lambda: (m := own.member("boot")) and m.lease != first.lease, timeout=15, what="re-registered")
    assert alive(etcd_pid)


def test_sigterm_while_the_embedded_etcd_cannot_start(env, tmp_path):
    """The agent waits for its bootstrap etcd before registering; a stop must still end that wait."""
    import socket

    from pdsupervisor.local.ports import free_port

    _, agent = env
    # the client port is bound (not listened on, so the readiness probe is refused): etcd
    # exits, backs off, starts again, never ready
    with socket.socket() as held:
        cport = free_port()
        held.bind(("127.0.0.1", cport))
        flags = ["--bootstrap-etcd", "--etcd-client-port", str(cport), "--etcd-peer-port", str(free_port())]
        a = agent(name="boot", etcd=f"127.0.0.1:{cport}", extra=flags)
        wait_for(lambda: (s := a.get("/status")) and s["bootstrap"] and s["bootstrap"][0]["restarts"] >= 1,
                 timeout=20, what="the embedded etcd failing to start")
        assert a.sigterm() == 0  # fails with the agent's log if it is still waiting


def test_sd_notify_ready_after_registration_and_children_without_notify_socket(env, tmp_path):
    import socket

    view, agent = env
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(15)
        view.assign("n1", spec("s", SLEEP))
        agent(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        got: list[bytes] = []
        deadline = time.monotonic() + 30

        def receive_until(done) -> None:
            while not done():
                assert time.monotonic() < deadline, f"notify messages so far: {got}"
                got.append(srv.recv(4096))

        receive_until(lambda: any(m.startswith(b"READY=1") for m in got))
        assert view.member("n1") is not None  # READY=1 only once registered
        receive_until(lambda: got.count(b"WATCHDOG=1") >= 2)
    pid = wait_for(lambda: view.status("n1").get("s", {}).get("pid"), timeout=15, what="child")
    assert "NOTIFY_SOCKET" not in psutil.Process(pid).environ()


def test_sigterm_does_not_wait_for_a_log_follower(env):
    """`systemctl restart pd-agent` while someone runs `pdsupervisor logs -f`: the agent
    ends the stream and exits at once, it does not wait out aiohttp's shutdown timeout."""
    import urllib.request

    view, agent = env
    a = agent()
    view.assign("n1", spec("s", [sys.executable, "-c", "print('hello', flush=True); import time; time.sleep(600)"]))
    wait_for(lambda: a.get("/logs/s") and "hello" in a.get("/logs/s"), timeout=15, what="a log line")
    with urllib.request.urlopen(a.url + "/logs/s?follow=1", timeout=30) as stream:
        assert b"hello" in stream.readline() + stream.readline()  # the agent's start marker, then ours
        assert a.sigterm() == 0
        # ended by the agent, whole: aiohttp's cancellation (the 3 s backstop) would cut the
        # chunked stream short (IncompleteRead); without either, sigterm() times out
        assert stream.read() == b""
