"""An etcd of three members, one per agent (127.0.0.1-3), with TLS for clients and peers, as
`pdsupervisor demo --etcd-members 3` runs it. The tests run in order on one cluster: it forms
from the agents' configurations; losing a node (agent, etcd member) changes nothing; a majority
lost stops changes but no engine; a node back rejoins with its member; a dead member is replaced.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from pdsupervisor.local.cluster import LocalCluster
from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree
from tests.conftest import wait_for
from tests.pdproc import http

pytestmark = pytest.mark.slow
TTL = 3


def _spec(cluster: str, lc: LocalCluster) -> dict[str, Any]:
    """node1 one prefill engine and the proxy, node2 one decode engine; node3 runs nothing but its
    etcd member (so losing it is losing a member, not an engine)."""
    sim = ["{python}", "-m", "pdsupervisor.simengine", "--model", "{model}", "--host", "{host}", "--port", "{port}",
           "-tp", "{tp}", "--sim-load-time", "0.2"]
    readiness = {"path": "/health", "period_s": 0.1}
    role = {"tp": 1, "slots": 1, "argv": sim, "readiness": readiness, "stop_timeout_s": 5}
    return {
        "cluster": cluster, "model": "sim-model", "engine_env": {"EDITION": "a"},
        "etcd": {"endpoints": [u.split("://")[1] for u in lc.etcd_endpoints]},
        "mooncake": {"enabled": False},
        "prefill": {**role, "node_names": ["node1"], "base_port": free_port()},
        "decode": {**role, "node_names": ["node2"], "base_port": free_port(), "dp_master_port": free_port()},
        "proxy": {"kind": "builtin", "port": free_port()},
        "policy": {"node_loss": "wait", "lease_ttl_s": TTL, "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 2}},
        "host_requirements": {"thp_mode": None},
    }


class Members:
    """The LocalCluster, and what a test asks of it over HTTP."""

    def __init__(self, tmp: Path) -> None:
        self.lc = LocalCluster(cluster=f"em-{uuid.uuid4().hex[:6]}", root=tmp, nodes=3, etcd_members=3,
                               etcd_port=free_port(), etcd_peer_port=free_port(), api_base_port=free_port(span=3),
                               ttl=TTL, tls=True, token=True)
        self.token = ""
        self.spec: dict[str, Any] = {}

    def get(self, path: str, node: int = 0) -> tuple[int, Any]:
        status, body = http("GET", self.lc.agents[node].api_url + path, timeout=5)
        return status, json.loads(body) if status else None

    def post(self, path: str, body: Any, node: int = 0) -> tuple[int, Any]:
        status, raw = http("POST", self.lc.agents[node].api_url + path, body,
                           {"Authorization": f"Bearer {self.token}"}, timeout=10)
        return status, json.loads(raw) if status else None

    def etcd(self, node: int = 0) -> dict[str, Any] | None:
        status, doc = self.get("/etcd", node)
        return doc if status == 200 else None

    def cluster(self, node: int = 0) -> dict[str, Any] | None:
        status, doc = self.get("/cluster", node)
        return doc if status == 200 else None

    def etcd_pid(self, node: int) -> int:
        _, status = self.get("/status", node)
        return int(status["bootstrap"][0]["pid"])

    def row(self, name: str) -> dict[str, Any] | None:
        doc = self.cluster()
        return next((p for p in doc["processes"] if p["name"] == name), None) if doc else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PDSUPERVISOR_API": self.lc.agents[0].api_url,
               "PDSUPERVISOR_TOKEN_FILE": str(self.lc.token_file), "COLUMNS": "200"}
        return subprocess.run([sys.executable, "-m", "pdsupervisor", *args], capture_output=True, text=True,
                              timeout=60, env=env)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    m = Members(tmp_path_factory.mktemp("etcd-members"))
    try:
        asyncio.run(m.lc.boot(90))
        m.token = m.lc.token_file.read_text().strip()
        yield m
    finally:
        m.lc.stop_agents()
        m.lc.kill_all()
        assert not m.lc.processes()


def _up(doc: dict[str, Any] | None) -> set[str]:
    return {x["name"] for x in doc["members"] if x["up"]} if doc else set()


def test_three_members_form_from_the_agents_configs(members):
    doc = wait_for(lambda: (d := members.etcd()) and d["leader"] and len(_up(d)) == 3 and d, 30,
                   what="3 members up with a leader")
    assert [x["name"] for x in doc["members"]] == ["node1", "node2", "node3"]
    assert all(x["client_urls"][0].startswith("https://127.0.0.") for x in doc["members"])  # TLS, one per node
    members.spec = _spec(members.lc.cluster, members.lc)
    assert members.post("/cluster/start", members.spec)[0] == 202
    wait_for(lambda: (d := members.cluster()) and d["phase"] == "ready", 60, what="ready")
    out = members.cli("status")
    assert out.returncode == 0 and "etcd: 3/3 members up, leader node" in out.stdout, out.stdout + out.stderr


def test_losing_a_node_and_its_member_changes_nothing(members):
    """node3's agent and etcd member killed at once: the others keep answering and reconciling."""
    node3 = members.lc.agents[2]
    kill_tree(node3.proc.pid)  # the agent, its etcd member (its child) with it
    node3.proc.wait(5)
    doc = wait_for(lambda: (d := members.etcd()) and _up(d) == {"node1", "node2"} and d["leader"] and d, 30,
                   what="2 of 3 members up with a leader")
    dead = next(x for x in doc["members"] if x["name"] == "node3")
    assert not dead["up"] and dead["errors"]
    for node in (0, 1):  # GET /cluster keeps answering on both other agents
        wait_for(lambda n=node: members.cluster(n) is not None, 15, what=f"GET /cluster on node{node + 1}")
    out = members.cli("status")
    assert "etcd: 2/3 members up" in out.stdout and "down: node3" in out.stdout, out.stdout
    # the node's agent restarts a killed engine, and the coordinator rolls out a spec change
    old = members.row("decode-0")["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (r := members.row("decode-0")) and r["pid"] not in (None, old) and r["state"] == "ready",
             30, what="decode-0 restarted")
    prefill = members.row("prefill-0")["pid"]
    changed = {**members.spec, "engine_env": {"EDITION": "b"}}
    assert members.post("/cluster/start?replace=true", changed)[0] == 202
    wait_for(lambda: (r := members.row("prefill-0")) and r["pid"] not in (None, prefill) and r["state"] == "ready"
             and members.cluster()["phase"] == "ready", 60, what="the spec change rolled out")
    # replacing a member that is up, or with a peer URL another member has, is refused
    for name, url, words in (("node2", f"https://127.0.0.9:{members.lc.etcd_peer_port}", "member node2 is up"),
                             ("node3", f"https://127.0.0.1:{members.lc.etcd_peer_port}", "already the peer URL")):
        status, answer = members.post("/etcd/replace-member", {"name": name, "peer_url": url})
        assert status == 409 and words in answer["error"], answer


def test_a_majority_lost_changes_nothing_and_kills_nothing(members):
    """node2's member paused too: no quorum. Engines keep running; GET /etcd says why; a
    replacement is refused; the quorum back, everything answers again."""
    engines = {r["name"]: r["pid"] for r in members.cluster()["processes"] if r["pid"]}
    etcd2 = psutil.Process(members.etcd_pid(1))
    etcd2.suspend()
    try:
        # node1 leading before steps down once it no longer hears from a quorum (raft's CheckQuorum)
        wait_for(lambda: (d := members.etcd()) and _up(d) == {"node1"} and d["leader"] is None, 30,
                 what="1 of 3 up, no leader")
        wait_for(lambda: members.get("/cluster")[0] == 503, 30, what="GET /cluster: 503 without a quorum")
        status, answer = members.post("/etcd/replace-member", {
            "name": "node3", "peer_url": f"https://127.0.0.3:{members.lc.etcd_peer_port}"})
        assert status in (409, 503) and "quorum" in answer["error"], answer
        assert "NO LEADER" in members.cli("status").stdout
        assert all(psutil.pid_exists(pid) for pid in engines.values())  # nothing killed
    finally:
        etcd2.resume()
    # leases lapsed meanwhile: agents register again and report; the same engines, never restarted
    wait_for(lambda: (d := members.cluster()) and {r["name"]: r["pid"] for r in d["processes"] if r["pid"]} == engines,
             30, what="GET /cluster answering with the same engines")
    assert all(psutil.pid_exists(pid) for pid in engines.values())


def test_a_node_back_rejoins_with_its_member(members):
    """node3's agent started again: its member comes back from its data dir, the same member."""
    old_id = next(x["id"] for x in members.etcd()["members"] if x["name"] == "node3")
    members.lc.start_agent(members.lc.agents[2])
    doc = wait_for(lambda: (d := members.etcd()) and len(_up(d)) == 3 and d["leader"] and d, 60,
                   what="3 members up again")
    assert next(x["id"] for x in doc["members"] if x["name"] == "node3") == old_id


def test_a_dead_member_is_replaced(members):
    """`pdsupervisor etcd replace-member`, then node3's agent with an empty data dir and
    initial_cluster_state existing: three members up again, node3's a new one."""
    node3 = members.lc.agents[2]
    kill_tree(node3.proc.pid)  # its disk lost, say: the member will not come back
    node3.proc.wait(5)
    wait_for(lambda: _up(members.etcd()) == {"node1", "node2"}, 30, what="node3's member down")
    old_id = next(x["id"] for x in members.etcd()["members"] if x["name"] == "node3")
    out = members.cli("etcd", "replace-member", "node3",
                      "--peer-url", f"https://127.0.0.3:{members.lc.etcd_peer_port}")
    assert out.returncode == 0, out.stdout + out.stderr
    printed = yaml.safe_load(out.stdout[out.stdout.index("bootstrap_etcd:"):])
    assert printed["bootstrap_etcd"] == {"members": members.lc.etcd_member_hosts,
                                         "initial_cluster_state": "existing"}
    shutil.rmtree(node3.state_dir / "etcd")
    node3.etcd_state = "existing"
    members.lc.start_agent(node3)
    doc = wait_for(lambda: (d := members.etcd()) and len(_up(d)) == 3 and d["leader"] and d, 60,
                   what="3 members up again")
    assert next(x["id"] for x in doc["members"] if x["name"] == "node3") != old_id
    out = members.cli("etcd", "members")
    assert out.returncode == 0 and "3/3 members up" in out.stdout, out.stdout
