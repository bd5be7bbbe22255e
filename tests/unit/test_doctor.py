"""`pdsupervisor doctor`: checks against fake /sys and /proc trees, --fix, ports, hard_failures."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pdsupervisor.cli.doctor import _cluster_checks, probe_etcd, report_json
from pdsupervisor.cli.main import main
from pdsupervisor.core.checks import (
    check_model,
    check_ports,
    check_protocol,
    check_rdma,
    fact_checks,
    hard_failures,
    held_by_cluster,
    ports_needed,
)
from pdsupervisor.core.cluster_view import Observed, SpecRecord, try_plan
from pdsupervisor.core.documents import NodesDocument
from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.planner import plan_cluster
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.host import probes
from pdsupervisor.local.ports import free_port
from tests.certs import TestCA
from tests.conftest import write

IB = "sys/class/infiniband"


@pytest.fixture(autouse=True)
def no_agent(monkeypatch):
    """No agent answers doctor here (whatever listens on this machine's 8470)."""
    monkeypatch.setenv("PDSUPERVISOR_API", f"http://127.0.0.1:{free_port()}")
THP = "sys/kernel/mm/transparent_hugepage/enabled"


def rdma(root: Path, dev: str, state: str, netdev: str | None = None) -> None:
    write(root, f"{IB}/{dev}/ports/1/state", state)
    if netdev:
        write(root, f"{IB}/{dev}/device/net/{netdev}/ifindex", "3")


def host_tree(root: Path, thp: str = "always madvise [never]", total: int = 1024, free: int = 1024) -> Path:
    write(root, THP, thp + "\n")
    write(root, "proc/meminfo", f"MemTotal: 1000 kB\nHugePages_Total: {total}\nHugePages_Free: {free}\n")
    write(root, "proc/sys/vm/nr_hugepages", f"{total}\n")
    for i in range(2):
        write(root, f"dev/accel/accel{i}")
    return root


def spec_doc(tmp: Path, **over) -> dict:
    doc = {
        "cluster": "doc", "model": str(tmp / "model"),
        "etcd": {"endpoints": [f"127.0.0.1:{free_port()}"]},
        "mooncake": {"rdma_devices": ["mlx5_0", "mlx5_3", "mlx5_4"], "port": free_port()},
        "prefill": {"node_names": ["n1"], "tp": 1, "slots": 1, "base_port": free_port()},
        "decode": {"node_names": ["n2"], "tp": 1, "slots": 2, "base_port": free_port(span=2), "dp_master_port": free_port()},
        "proxy": {"port": free_port()},
        "host_requirements": {"thp_mode": "always", "hugepages": 32768, "hard": ["hugepages"]},
    }
    for key, value in over.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    return doc


def spec_file(tmp: Path, **over) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_doc(tmp, **over)))
    return path


def doctor(root: Path, spec: Path, *extra: str) -> tuple[int, dict]:
    args = ["doctor", "-f", str(spec), "--root", str(root), "--name", "n1", "--ip", "127.0.0.1",
            "--node", "n2=127.0.0.2", "-o", "json", *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, json.loads(result.output)


def by_check(doc: dict) -> dict[str, dict]:
    return {r["check"]: r for r in doc["results"]}


def local(root: Path) -> NodeFacts:
    total, free = probes.hugepages(root)
    return NodeFacts(name="n1", ip="127.0.0.1", rdma_devices=probes.rdma_devices(root),
                     hugepages_total=total, hugepages_free=free, thp_mode=probes.thp_mode(root))


def test_rdma_up_down_absent_and_outside_the_allow_list(tmp_path):
    rdma(tmp_path, "mlx5_0", "4: ACTIVE\n", "ens1f0")
    rdma(tmp_path, "mlx5_3", "1: DOWN\n", "ens3f0")
    rdma(tmp_path, "mlx5_1", "4: ACTIVE\n")  # up, but not allowed
    spec = validate_spec(spec_doc(tmp_path))
    r = check_rdma(spec, local(tmp_path))
    assert r.status == "WARN"  # usable, but an allowed device is down
    assert "mlx5_0 Up (ACTIVE; ens1f0)" in r.found and "mlx5_3 Down (DOWN; ens3f0)" in r.found
    assert "absent: mlx5_4" in r.found and "not in allow-list: mlx5_1" in r.found
    assert r.fix == "ip link set dev ens3f0 up"
    assert check_protocol(spec, local(tmp_path)).found == "rdma via mlx5_0"


def test_rdma_all_down_is_hard_when_listed(tmp_path):
    rdma(tmp_path, "mlx5_0", "1: DOWN\n")
    spec = validate_spec(spec_doc(tmp_path, host_requirements={"hard": ["rdma"]}))
    r = check_rdma(spec, local(tmp_path))
    assert (r.status, r.fix) == ("FAIL", "ibstat mlx5_0")
    p = check_protocol(spec, local(tmp_path))
    assert (p.status, p.found) == ("WARN", "tcp")


def test_rdma_absent_and_only_unlisted_devices(tmp_path):
    spec = validate_spec(spec_doc(tmp_path))
    r = check_rdma(spec, local(tmp_path))
    assert (r.status, r.found) == ("WARN", "absent: mlx5_0, mlx5_3, mlx5_4")
    rdma(tmp_path, "mlx5_1", "4: ACTIVE\n")
    r = check_rdma(spec, local(tmp_path))
    assert r.status == "WARN" and "mooncake.rdma_devices" in r.fix
    tcp = validate_spec(spec_doc(tmp_path, mooncake={"protocol": "tcp"}))
    assert check_rdma(tcp, local(tmp_path)).status == "OK"
    assert check_protocol(tcp, local(tmp_path)).found == "tcp"


def test_hugepages_short_and_thp_madvise(tmp_path):
    root = host_tree(tmp_path / "root", thp="always [madvise] never", total=1024, free=512)
    code, doc = doctor(root, spec_file(tmp_path))
    checks = by_check(doc)
    assert code == 1 and doc["status"] == "FAIL"
    assert checks["hugepages"] == {"check": "hugepages", "status": "FAIL", "found": "1024", "needed": ">= 32768",
                                   "fix": "echo 32768 > /proc/sys/vm/nr_hugepages"}
    assert checks["thp"]["status"] == "WARN" and checks["thp"]["found"] == "madvise"  # not in `hard`
    assert checks["thp"]["fix"] == "echo always > /sys/kernel/mm/transparent_hugepage/enabled"
    assert checks["hugepages_free"]["status"] == "WARN" and checks["hugepages_free"]["found"] == "512 of 1024"
    assert checks["accelerators"]["status"] == "OK" and checks["accelerators"]["needed"].startswith(">= 1 (prefill)")
    assert checks["model"]["status"] == "FAIL"
    assert doc["fixes"] == []


def test_fix_writes_the_fake_tree_and_reports_it(tmp_path):
    root = host_tree(tmp_path / "root", thp="always [madvise] never", total=1024)
    (tmp_path / "model").mkdir()
    code, doc = doctor(root, spec_file(tmp_path), "--fix")
    assert (root / THP).read_text() == "always\n"
    assert (root / "proc/sys/vm/nr_hugepages").read_text() == "32768\n"
    fixes = {f["check"]: f for f in doc["fixes"]}
    assert fixes["thp"]["before"] == "madvise" and fixes["thp"]["after"] == "always" and fixes["thp"]["error"] is None
    assert fixes["hugepages"]["before"] == "1024" and fixes["hugepages"]["after"] == "32768"
    assert by_check(doc)["hugepages"]["status"] == "OK"  # checked again after the fix
    assert code == 0


def test_fix_never_lowers_hugepages_and_table_says_what_changed(tmp_path):
    root = host_tree(tmp_path / "root", thp="[always] madvise never", total=40000, free=40000)
    (tmp_path / "model").mkdir()
    args = ["doctor", "-f", str(spec_file(tmp_path)), "--root", str(root), "--name", "n1", "--ip", "127.0.0.1",
            "--node", "n2=127.0.0.2", "--fix"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert (root / "proc/sys/vm/nr_hugepages").read_text() == "40000\n"
    assert "fixed" not in result.output and "hugepages" in result.output
    write(root, THP, "always [madvise] never\n")
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert "fixed thp: wrote always to" in result.output and "(was madvise)" in result.output


def test_taken_port_is_reported(tmp_path):
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    path = spec_file(tmp_path)
    port = yaml.safe_load(path.read_text())["prefill"]["base_port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        code, doc = doctor(root, path)
    ports = by_check(doc)["ports"]
    assert code == 1 and ports["status"] == "FAIL"
    assert ports["found"].startswith(f"{port} taken") and "(needed by prefill-0)" in ports["found"]
    assert f"sport = :{port}" in ports["fix"]
    code, doc = doctor(root, path)
    assert by_check(doc)["ports"]["status"] == "OK"


def test_etcd_unreachable_is_a_warning(tmp_path):
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    (tmp_path / "model").mkdir()
    code, doc = doctor(root, spec_file(tmp_path))
    checks = by_check(doc)
    assert checks["etcd"]["status"] == "WARN" and "cannot connect" in checks["etcd"]["found"].lower()
    assert checks["clock"]["found"] == "not measured (etcd unreachable)"
    assert code == 0 and checks["model"]["status"] == "OK"


@pytest.fixture
def fake_etcd():
    """A loopback /version whose Date header is an hour behind ours."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"etcdserver":"3.5.9","etcdcluster":"3.5.0"}'
            self.send_response_only(200)
            self.send_header("Date", email.utils.formatdate(time.time() - 3600, usegmt=True))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_etcd_version_and_clock_offset(fake_etcd, tmp_path):
    probe = probe_etcd(fake_etcd)
    assert probe.error is None and probe.version == "3.5.9"
    assert probe.offset_s is not None and 3598 < probe.offset_s < 3602
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    code, doc = doctor(root, spec_file(tmp_path), "--etcd", fake_etcd)
    checks = by_check(doc)
    assert checks["etcd"]["status"] == "OK" and checks["clock"]["status"] == "WARN"
    assert 3598 < float(checks["clock"]["found"].split("s ", 1)[0]) < 3602


def test_tls_to_a_plaintext_etcd_is_a_failure_saying_so(fake_etcd, tmp_path):
    """--etcd-ca makes doctor speak https: a plaintext etcd there is named as such, not as unreachable."""
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    ca = TestCA(tmp_path / "ca")
    code, doc = doctor(root, spec_file(tmp_path), "--etcd", fake_etcd, "--etcd-ca", str(ca.path))
    etcd = by_check(doc)["etcd"]
    assert code == 1 and etcd["status"] == "FAIL"
    assert etcd["found"].startswith(f"etcd at https://{fake_etcd}: it does not speak TLS there")


def test_model_hub_id_is_not_a_path(tmp_path):
    spec = validate_spec(spec_doc(tmp_path, model="deepseek-ai/DeepSeek-R1"))
    assert check_model(spec, None).status == "OK"


def nodes(**hugepages: int) -> dict[str, NodeFacts]:
    return {n: NodeFacts(name=n, ip=f"127.0.0.{i + 1}", hugepages_total=h, thp_mode="madvise")
            for i, (n, h) in enumerate(hugepages.items())}


def test_hard_failures_refuses_a_node_with_too_few_hugepages(tmp_path):
    spec = validate_spec(spec_doc(tmp_path))
    members = nodes(n1=32768, n2=100)
    plan = plan_cluster(spec, members)
    assert hard_failures(spec, members, plan) == [("n2", "hugepages", "found 100, needs >= 32768")]
    members = nodes(n1=32768, n2=32768)
    assert hard_failures(spec, members, plan_cluster(spec, members)) == []  # THP madvise: not hard
    soft = validate_spec(spec_doc(tmp_path, host_requirements={"hard": []}))
    assert hard_failures(soft, nodes(n1=0, n2=0), plan_cluster(soft, nodes(n1=0, n2=0))) == []


def test_try_plan_stays_pending_on_a_hard_failure(tmp_path):
    doc = spec_doc(tmp_path)
    record = SpecRecord(generation=1, spec=doc)
    obs = Observed(record=record, members=nodes(n1=32768, n2=100), assignments={}, statuses={})
    spec, plan, missing = try_plan(obs)
    assert spec is not None and plan is None
    assert missing == ["n2: hugepages: found 100, needs >= 32768"]
    obs = dataclasses.replace(obs, members=nodes(n1=32768, n2=32768))
    assert try_plan(obs)[1] is not None


def test_cluster_results_from_registered_facts(tmp_path):
    class FakeClient:
        async def nodes(self) -> NodesDocument:
            return NodesDocument(leader=None, nodes=list(nodes(n1=32768, n2=100, n3=0).values()))

    spec = validate_spec(spec_doc(tmp_path))
    doc = json.loads(report_json(asyncio.run(_cluster_checks(FakeClient(), spec))))  # type: ignore[arg-type]  # a fake client
    assert doc["status"] == "FAIL" and doc["plan"] == "planned"
    assert doc["nodes"]["n1"]["roles"] == ["mooncake-master", "prefill", "proxy"] and doc["nodes"]["n1"]["status"] == "WARN"
    n2 = {r["check"]: r for r in doc["nodes"]["n2"]["results"]}
    assert n2["hugepages"]["status"] == "FAIL" and n2["accelerators"]["needed"].startswith(">= 2 (decode)")
    assert doc["nodes"]["n3"]["roles"] == [] and fact_checks(spec, nodes(n3=0)["n3"], [])[1].status == "FAIL"


def test_cluster_table_and_exit_code(tmp_path, monkeypatch):
    class FakeClient:
        async def nodes(self) -> NodesDocument:
            return NodesDocument(leader=None, nodes=list(nodes(n1=32768, n2=100).values()))

    monkeypatch.setattr("pdsupervisor.cli.doctor.make_client", lambda *a: FakeClient())
    args = ["doctor", "--cluster", "-f", str(spec_file(tmp_path))]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    rows = [[c.strip() for c in line.split("│")[1:4]] for line in result.output.splitlines() if line.count("│") > 4]
    assert [r for r in rows if r[1] == "hugepages"] == [["n1", "hugepages", "OK"], ["n2", "hugepages", "FAIL"]]
    assert "--fix applies to this host only" in CliRunner().invoke(main, [*args, "--fix"]).output


def test_ports_without_a_plan_leave_out_a_disabled_master(tmp_path):
    on = validate_spec(spec_doc(tmp_path))
    off = validate_spec(spec_doc(tmp_path, mooncake={"enabled": False}))
    assert ports_needed(on, None, "n1")[on.mooncake.port] == "mooncake-master"
    assert on.mooncake.port not in ports_needed(off, None, "n1")
    assert ports_needed(off, None, "n1")[off.proxy.port] == "proxy"
    http = validate_spec(spec_doc(tmp_path, mooncake={"metadata": "master-http", "metadata_port": free_port()}))
    assert ports_needed(http, None, "n1")[http.mooncake.metadata_port] == "mooncake-master metadata"
    assert on.mooncake.metadata_port not in ports_needed(on, None, "n1")  # p2p: no metadata server


def test_ports_held_by_the_clusters_own_processes():
    cluster = {100: "prefill-0", 101: "prefill-0", 200: "etcd"}  # 101: prefill-0's child
    holders = {8100: {101}, 2379: {200}, 8200: {300}, 8300: {100, 300}, 8400: set()}
    ours = held_by_cluster(holders, cluster)
    assert ours == {8100: "prefill-0 (pid 101)", 2379: "etcd (pid 200)"}  # a stranger's, or unknown: not ours
    needed = {8100: "prefill-0", 2379: "etcd", 8200: "proxy"}
    r = check_ports(needed, {8100: "python (pid 101)", 2379: "etcd (pid 200)"}, ours)
    assert r.status == "OK" and "8100 held by this node's prefill-0 (pid 101) (needed by prefill-0)" in r.found
    r = check_ports(needed, {8100: "", 8200: "nginx (pid 300)"}, ours)
    assert r.status == "FAIL" and r.found.startswith("8200 taken by nginx (pid 300) (needed by proxy); 8100 held")
    assert r.fix == "ss -ltnp 'sport = :8200'"
    assert check_ports(needed, {8100: ""}).status == "FAIL"  # without the agent's word: a clash, as before


def test_mooncake_disabled_skips_rdma_and_protocol(tmp_path):
    spec = validate_spec(spec_doc(tmp_path, mooncake={"enabled": False}, host_requirements={"hard": ["rdma"]}))
    results = {r.check: r for r in fact_checks(spec, local(tmp_path), ["prefill"])}
    assert {results[c].status for c in ("rdma", "mooncake_protocol")} == {"OK"}
    assert results["rdma"].found == "skipped: mooncake.enabled is false"
    members = {"n1": NodeFacts(name="n1", ip="127.0.0.1", hugepages_total=32768),
               "n2": NodeFacts(name="n2", ip="127.0.0.2", hugepages_total=32768)}
    assert hard_failures(spec, members, plan_cluster(spec, members)) == []


def test_plan_header_names_a_master_only_with_mooncake(tmp_path):
    args = ["plan", "--node", "n1=127.0.0.1", "--node", "n2=127.0.0.2", "-f"]
    on = CliRunner().invoke(main, [*args, str(spec_file(tmp_path))], catch_exceptions=False).output
    assert "master 127.0.0.1:" in on
    off = CliRunner().invoke(main, [*args, str(spec_file(tmp_path, mooncake={"enabled": False}))],
                             catch_exceptions=False).output
    assert "master 127.0.0.1:" not in off and "DP size" in off


def test_name_and_etcd_from_the_agent_config(fake_etcd, tmp_path):
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"name": "n2", "etcd": [fake_etcd], "ttl": 10}))
    args = ["doctor", "-f", str(spec_file(tmp_path)), "--root", str(root), "--ip", "127.0.0.2",
            "--node", "n1=127.0.0.1", "--agent-config", str(conf), "-o", "json"]
    doc = json.loads(CliRunner().invoke(main, args, catch_exceptions=False).output)
    assert doc["node"] == "n2" and doc["roles"] == ["decode"]
    assert doc["agent"].startswith("no agent at http://127.0.0.1:")  # one line, and today's behaviour
    assert by_check(doc)["etcd"]["found"] == f"http://{fake_etcd} 3.5.9"
    doc = json.loads(CliRunner().invoke(main, [*args, "--name", "n1", "--etcd", "127.0.0.1:1"]).output)
    assert doc["node"] == "n1" and by_check(doc)["etcd"]["status"] == "WARN"  # flags win
    missing = CliRunner().invoke(main, [*args[:-4], "--agent-config", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "no such file" in missing.output
