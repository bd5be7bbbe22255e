"""`pdsupervisor doctor` on a live node: a real agent answers, so doctor plans on the registered
members and takes the ports its supervised processes (and their children) hold as the cluster's own."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import yaml
from click.testing import CliRunner

from pdsupervisor.cli.main import main
from pdsupervisor.core.models import NodeAssignment, ProcessSpec
from pdsupervisor.local.procs import kill_tree
from pdsupervisor.store.etcd import Store
from tests.agent_helpers import AgentProc, kill_marked, run
from tests.conftest import wait_for
from tests.unit.test_doctor import by_check, host_tree, spec_doc

# The supervised process leaves the listening to a child, as an engine's workers may.
LISTEN_IN_CHILD = (
    "import subprocess, sys, time\n"
    "code = ('import socket, sys, time; s = socket.socket(); '\n"
    "        's.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); '\n"
    "        's.bind((\"127.0.0.1\", int(sys.argv[1]))); s.listen(); time.sleep(600)')\n"
    "subprocess.Popen([sys.executable, '-c', code, sys.argv[1]])\n"
    "time.sleep(600)\n"
)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def agents(etcd_server, cluster_name, tmp_path):
    started: list[AgentProc] = []
    marker = os.urandom(8).hex()

    def agent(name: str) -> AgentProc:
        a = AgentProc(tmp_path, etcd_server.endpoint, cluster_name, name=name, marker=marker)
        started.append(a)
        return a.start()

    try:
        yield agent
    finally:
        for a in started:
            if a.proc and a.proc.poll() is None:
                kill_tree(a.proc.pid)
        kill_marked(marker)


def test_doctor_on_a_live_node(agents, etcd_server, cluster_name, tmp_path):
    doc = spec_doc(tmp_path, cluster=cluster_name, etcd={"endpoints": [etcd_server.endpoint]},
                   mooncake={"enabled": False}, host_requirements={"hard": []})
    (tmp_path / "model").mkdir()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    port = doc["prefill"]["base_port"]
    n1, n2 = agents("n1"), agents("n2")
    for a in (n1, n2):
        wait_for(lambda a=a: (a.get("/healthz") or {}).get("registered"), timeout=15, what=f"{a.name} registered")

    assignment = NodeAssignment(node="n1", processes=[ProcessSpec(
        name="prefill-0", role="prefill", argv=[sys.executable, "-c", LISTEN_IN_CHILD, str(port)], stop_timeout_s=3)])

    async def assign(s: Store) -> None:
        await s.put(s.keys.assignment("n1"), assignment.model_dump_json().encode())

    async def put() -> None:
        async with Store([etcd_server.endpoint], cluster_name) as s:
            await assign(s)

    run(put())
    wait_for(lambda: n1.local_procs().get("prefill-0", {}).get("pid") and listening(port), timeout=15,
             what="prefill-0 listening through its child")

    # name and etcd from the agent's config, not from flags
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"name": "n1", "etcd": [etcd_server.endpoint], "cluster": cluster_name}))
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    args = ["doctor", "-f", str(spec_path), "--root", str(root), "--ip", "127.0.0.1", "--api", n1.url,
            "--agent-config", str(conf), "-o", "json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    report = json.loads(result.output)
    checks = by_check(report)
    assert report["node"] == "n1" and report["plan"] == "planned", report
    assert "n1 is registered" in report["agent"] and "2 registered member(s)" in report["agent"]
    assert report["roles"] == ["prefill", "proxy"]
    assert checks["ports"]["status"] == "OK", checks["ports"]
    assert f"{port} held by this node's prefill-0" in checks["ports"]["found"]
    assert checks["rdma"] == {"check": "rdma", "status": "OK", "found": "skipped: mooncake.enabled is false",
                              "needed": "none", "fix": ""}
    assert checks["mooncake_protocol"]["status"] == "OK"
    assert checks["etcd"]["status"] == "OK" and etcd_server.endpoint in checks["etcd"]["found"]
    assert result.exit_code == 0, result.output

    # no agent answering: today's behaviour, saying so in one line
    n1.sigterm()
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert json.loads(result.output)["agent"].startswith(f"no agent at {n1.url}")
