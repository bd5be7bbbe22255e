"""pd-agent and the built-in proxy against etcd over TLS, as real processes: the embedded
etcd serves TLS with client-certificate auth, agents and the proxy get in with their
certificates, strangers do not; plaintext off loopback is refused unless allowed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pdsupervisor.core import pki
from pdsupervisor.core.models import NodeFacts, NodeStatus, ProcessState, ProcessStatus, TlsFiles
from pdsupervisor.host import pki as pki_files
from pdsupervisor.host.probes import default_ip
from pdsupervisor.local.ports import free_port
from pdsupervisor.store.etcd import Store, StoreUnavailable
from pdsupervisor.store.transport import client_ssl_context, tls_context
from tests.agent_helpers import ROOT, AgentProc, alive, kill_marked
from tests.conftest import EtcdServer, wait_for
from tests.pdproc import http


def _files(d: Path, cert: str, key: str) -> TlsFiles:
    return TlsFiles(ca_file=str(d / "ca.crt"), cert_file=str(d / cert), key_file=str(d / key))


class Pki:
    def __init__(self, root: Path, nodes: list[pki.NodeId]) -> None:
        self.root = root
        pki_files.init(root, nodes)

    def client(self, node: str) -> TlsFiles:
        return _files(self.root / pki.node_dir(node), "client.crt", "client.key")

    def server(self, node: str) -> TlsFiles:
        return _files(self.root / pki.node_dir(node), "server.crt", "server.key")

    @property
    def admin(self) -> TlsFiles:
        return _files(self.root / pki.client_dir("admin"), "client.crt", "client.key")


def _config(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _members(endpoint: str, cluster: str, tls: TlsFiles | None) -> set[str]:
    async def read() -> set[str]:
        async with Store([endpoint], cluster, tls=tls_context(tls) if tls else None, timeout_s=2) as store:
            return set(await store.members())
    try:
        return asyncio.run(read())
    except StoreUnavailable:
        return set()


@pytest.fixture
def agents(tmp_path, cluster_name):
    started: list[AgentProc] = []
    marker = os.urandom(8).hex()

    def start(name: str, etcd: str, *extra: str) -> AgentProc:
        a = AgentProc(tmp_path, etcd, cluster_name, name=name, marker=marker, extra=list(extra))
        started.append(a)
        return a.start()

    yield start
    for a in started:
        if a.proc and a.proc.poll() is None:
            a.sigterm()
    kill_marked(marker)  # the embedded etcd, left running by design


def test_bootstrap_etcd_over_tls_and_agents_with_client_certificates(agents, tmp_path, cluster_name):
    ca = Pki(tmp_path / "pki", [pki.NodeId("n1", "127.0.0.1"), pki.NodeId("n2", "127.0.0.1")])
    cport, pport = free_port(), free_port()
    endpoint = f"127.0.0.1:{cport}"

    def config(node: str, bootstrap: bool) -> Path:
        doc: dict = {"etcd_tls": ca.client(node).model_dump()}
        if bootstrap:
            server = ca.server(node)
            doc["bootstrap_etcd"] = {"enabled": True, "client_port": cport, "peer_port": pport,
                                     "cert_file": server.cert_file, "key_file": server.key_file}
        return _config(tmp_path / f"{node}.yaml", doc)

    n1 = agents("n1", endpoint, "--config", str(config("n1", True)))
    n2 = agents("n2", endpoint, "--config", str(config("n2", False)))
    wait_for(lambda: _members(endpoint, cluster_name, ca.admin) == {"n1", "n2"}, timeout=30,
             what=f"both agents registered over TLS; n1 log:\n{n1.logs()}")

    etcd = psutil.Process(n1.get("/status")["bootstrap"][0]["pid"])
    argv = etcd.cmdline()
    assert "--client-cert-auth" in argv and "--peer-client-cert-auth" in argv
    assert argv[argv.index("--listen-client-urls") + 1] == f"https://127.0.0.1:{cport}"
    assert argv[argv.index("--cert-file") + 1] == ca.server("n1").cert_file

    async def facts() -> NodeFacts:
        async with Store([endpoint], cluster_name, tls=tls_context(ca.admin)) as store:
            return (await store.members())["n2"]
    assert asyncio.run(facts()).etcd_access.tls == ca.client("n2")  # for a proxy planned on n2
    assert _members(f"http://{endpoint}", cluster_name, None) == set()  # plaintext gets nothing
    stranger = Pki(tmp_path / "other", [pki.NodeId("n1", "127.0.0.1")])
    with pytest.raises(StoreUnavailable):
        asyncio.run(_put(endpoint, cluster_name, stranger.client("n1"), ca.admin.ca_file))
    assert n2.get("/healthz")["etcd_reachable"] is True
    assert n1.sigterm() == 0 and n2.sigterm() == 0


def test_a_rotated_server_certificate_restarts_the_embedded_etcd_an_unchanged_one_is_adopted(
        agents, tmp_path, cluster_name):
    ca = Pki(tmp_path / "pki", [pki.NodeId("n1", "127.0.0.1")])
    cport = free_port()
    endpoint = f"127.0.0.1:{cport}"
    server = ca.server("n1")
    cfg = _config(tmp_path / "n1.yaml", {
        "etcd_tls": ca.client("n1").model_dump(),
        "bootstrap_etcd": {"enabled": True, "client_port": cport, "peer_port": free_port(),
                           "cert_file": server.cert_file, "key_file": server.key_file}})

    def etcd_pid(a: AgentProc) -> int:
        return wait_for(lambda: (s := a.get("/status")) and s["bootstrap"] and s["bootstrap"][0]["pid"], timeout=20,
                        what="the embedded etcd")

    def registered_by(a: AgentProc) -> None:
        wait_for(lambda: (h := a.get("/healthz")) and h["registered"], timeout=20, what=f"registration; log:\n{a.logs()}")

    a = agents("n1", endpoint, "--config", str(cfg))
    registered_by(a)
    first = etcd_pid(a)
    assert a.sigterm() == 0
    b = agents("n1", endpoint, "--config", str(cfg))
    registered_by(b)
    assert etcd_pid(b) == first  # same files: adopted, as without TLS
    assert b.sigterm() == 0
    pki_files.add_node(ca.root, pki.NodeId("n1", "127.0.0.1"), replace=True)  # rotation, same CA
    c = agents("n1", endpoint, "--config", str(cfg))
    registered_by(c)
    assert etcd_pid(c) != first and not alive(first)  # the old one stopped (a zombie of init counts as gone)
    assert c.sigterm() == 0


async def _put(endpoint: str, cluster: str, cert: TlsFiles, ca_file: str) -> None:
    async with Store([endpoint], cluster, tls=client_ssl_context(ca_file, cert.cert_file, cert.key_file),
                     timeout_s=2) as store:
        await store.put(store.keys.assignment("n1"), b"{}")


def test_builtin_proxy_reads_membership_from_a_tls_etcd(procs, tmp_path, cluster_name):
    ca = Pki(tmp_path / "pki", [pki.NodeId("etcd", "127.0.0.1"), pki.NodeId("n1", "127.0.0.1")])
    server = EtcdServer(tmp_path, tls=ca.server("etcd"), client=ca.admin)
    server.start()
    try:
        pre, _ = procs.engine("prefill")
        dec, _ = procs.engine("decode")

        async def register() -> None:
            async with Store([server.endpoint], cluster_name, tls=tls_context(ca.admin)) as store:
                lease = await store.grant_lease(60)
                await store.register_member(NodeFacts(name="n1", ip="127.0.0.1", registered_at=time.time()), lease)
                engines = [ProcessStatus(name=f"{r}-0", role=r, state=ProcessState.ready, pid=1, endpoint=e)
                           for r, e in (("prefill", pre), ("decode", dec))]
                await store.put_status(NodeStatus(node="n1", updated_at=time.time(), processes=engines))
        asyncio.run(register())
        n1 = ca.client("n1")
        base, _ = procs.proxy("--cluster", cluster_name, "--etcd", server.endpoint,
                              "--etcd-ca", n1.ca_file, "--etcd-cert", n1.cert_file, "--etcd-key", n1.key_file)

        def routed() -> bool:
            st = json.loads(http("GET", base + "/status")[1])
            return sorted(i["endpoint"] for i in st["instances"]) == sorted([pre, dec])
        wait_for(routed, timeout=15, what="the proxy to read its engines over TLS")
        assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200
    finally:
        server.stop()


def _agent_main(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_plaintext_etcd_off_loopback_exits_2_naming_the_field(tmp_path):
    out = _agent_main("--name", "n1", "--ip", "127.0.0.1", "--etcd", "10.0.0.9:2379",
                      "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}")
    assert out.returncode == 2
    assert "etcd: endpoint http://10.0.0.9:2379 is plaintext and not loopback" in out.stderr
    assert "etcd_tls" in out.stderr and "allow_plaintext_etcd: true" in out.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_an_unreadable_client_key_exits_2_naming_etcd_tls(tmp_path):
    ca = Pki(tmp_path / "pki", [pki.NodeId("n1", "127.0.0.1")])
    tls = ca.client("n1").model_dump() | {"key_file": str(tmp_path / "missing.key")}
    cfg = _config(tmp_path / "agent.yaml", {"etcd": ["10.0.0.9:2379"], "etcd_tls": tls})
    out = _agent_main("--config", str(cfg), "--name", "n1", "--ip", "127.0.0.1", "--state-dir", str(tmp_path / "s"),
                      "--listen", f"127.0.0.1:{free_port()}")
    assert out.returncode == 2 and "etcd_tls:" in out.stderr and "missing.key" in out.stderr


def test_allow_plaintext_etcd_starts_and_warns(agents, tmp_path, cluster_name):
    ip = default_ip()
    if ip.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address to serve etcd on")
    server = EtcdServer(tmp_path, host=ip)
    server.start()
    try:
        cfg = _config(tmp_path / "agent.yaml", {"allow_plaintext_etcd": True})
        a = agents("n1", server.endpoint, "--config", str(cfg))
        wait_for(lambda: _members(server.endpoint, cluster_name, None) == {"n1"}, timeout=20,
                 what=f"the agent registered over plaintext; log:\n{a.logs()}")
        assert f"etcd: endpoint http://{server.endpoint} is plaintext and not loopback (allowed by allow_plaintext_etcd)" \
            in a.logs()
        assert a.sigterm() == 0
    finally:
        server.stop()
