"""Several pd-agents on one machine (127.0.0.1, .2, .3, ...): what the demo and benchmarks run.

Each agent is a real `python -m agent.main` process. Every process of the local cluster,
down to the engines, inherits one marker in its environment, so `kill_all()` finds and ends
the whole set (the agents leave their children running by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from pdsupervisor.api.client import DEFAULT_API_PORT, ApiClient
from pdsupervisor.core import pki
from pdsupervisor.core.checks import ports_needed
from pdsupervisor.core.models import TlsFiles
from pdsupervisor.core.spec import ClusterSpec
from pdsupervisor.host import pki as pki_files
from pdsupervisor.host.files import atomic_write
from pdsupervisor.host.private import private_dir
from pdsupervisor.local.procs import marked_processes, signal_all

MARKER_ENV = "PDSUPERVISOR_LOCAL_CLUSTER"
DEMO_STATE_DIR = Path("/tmp/pdsupervisor-demo")  # `pdsupervisor demo --state-dir` default


class BootError(RuntimeError):
    """An agent exited, or not every agent registered in time."""


@dataclass
class LocalAgent:
    name: str
    ip: str
    api_port: int
    state_dir: Path
    bootstrap_etcd: bool = False
    etcd_state: str = "new"  # `existing`: its member was added to the running cluster (a replacement)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.ip}:{self.api_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "agent.log"


@dataclass
class LocalCluster:
    """`nodes` agents named node1..nodeN on 127.0.0.1..N; node1 bootstraps etcd, or with
    `etcd_members` N > 1 node1..nodeN each run one member of one etcd cluster."""

    cluster: str
    root: Path
    nodes: int = 3
    etcd_port: int = 2379
    etcd_peer_port: int = 0  # 0: etcd_port + 1
    api_base_port: int = DEFAULT_API_PORT  # node1 where the CLI looks by default: plain `pdsupervisor status`
    ttl: int = 5
    tls: bool = False  # etcd over TLS with client certificates, from a PKI made in <root>/pki
    token: bool = False  # the agents' REST API wants the bearer token in <root>/token for writes and logs
    etcd_members: int = 1  # agents node1..nodeN each running an etcd member (1: node1's one-member etcd)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    agents: list[LocalAgent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.etcd_peer_port = self.etcd_peer_port or self.etcd_port + 1
        if not 1 <= self.etcd_members <= self.nodes:
            raise ValueError(f"etcd_members: {self.etcd_members}, but the cluster has {self.nodes} nodes")
        self.agents = [
            LocalAgent(
                name=f"node{i + 1}", ip=f"127.0.0.{i + 1}", api_port=self.api_base_port + i,
                state_dir=self.root / f"node{i + 1}", bootstrap_etcd=(i < self.etcd_members),
            )
            for i in range(self.nodes)
        ]

    def ports_needed(self, spec: ClusterSpec) -> dict[int, str]:
        """Every port this cluster's processes bind, all on this machine: the spec's (any
        role's, as `doctor` without a plan) and the agents' APIs; port -> who needs it."""
        needed = ports_needed(spec, None, self.agents[0].name)
        needed.update({a.api_port: f"{a.name}'s agent API" for a in self.agents})
        return needed

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd_endpoints[0]

    @property
    def etcd_endpoints(self) -> list[str]:
        """Every etcd member's client URL (node1's first)."""
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://{a.ip}:{self.etcd_port}" for a in self.agents if a.bootstrap_etcd]

    @property
    def etcd_member_hosts(self) -> dict[str, str]:
        """member name -> host, as `bootstrap_etcd.members` says it (empty: a one-member etcd)."""
        return {a.name: a.ip for a in self.agents if a.bootstrap_etcd} if self.etcd_members > 1 else {}

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    def make_pki(self) -> None:
        """The cluster's CA and every node's certificates (`pdsupervisor pki init`), once."""
        if not (self.pki_dir / pki.CA_CERT).exists():
            pki_files.init(self.pki_dir, [pki.NodeId(a.name, a.ip) for a in self.agents], ca_name=f"{self.cluster} demo CA")

    def client_files(self, name: str = pki.ADMIN) -> TlsFiles:
        """A client's TLS files in this cluster's PKI (`admin`: what etcdctl or a test uses)."""
        d = self.pki_dir / pki.client_dir(name)
        return TlsFiles(ca_file=str(d / pki.CA_CERT), cert_file=str(d / pki.CLIENT_CERT), key_file=str(d / pki.CLIENT_KEY))

    @property
    def token_file(self) -> Path:
        return self.root / "token"

    def make_token(self) -> None:
        """The agents' REST token (0600, in the private root), once."""
        if not self.token_file.exists():
            private_dir(self.root)
            atomic_write(self.token_file, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)

    def client(self, index: int = 0, timeout_s: float = 10.0) -> ApiClient:
        """An API client of agent `index`, carrying the token when the cluster has one."""
        token = self.token_file.read_text().strip() if self.token else None
        return ApiClient(self.agents[index].api_url, token=token, timeout_s=timeout_s)

    def config(self, agent: LocalAgent) -> dict[str, object]:
        """The agent's configuration file: its etcd TLS files (with `tls`), its token (with `token`)."""
        doc: dict[str, object] = {}
        boot: dict[str, object] = {}
        if self.token:
            doc["rest"] = {"token_file": str(self.token_file)}
        if self.etcd_members > 1:  # every agent lists every member (and so every endpoint)
            boot.update(members=self.etcd_member_hosts, client_port=self.etcd_port, peer_port=self.etcd_peer_port,
                        initial_cluster_state=agent.etcd_state)
        if self.tls:
            d = self.pki_dir / pki.node_dir(agent.name)
            doc["etcd_tls"] = {"ca_file": str(d / pki.CA_CERT), "cert_file": str(d / pki.CLIENT_CERT),
                               "key_file": str(d / pki.CLIENT_KEY)}
            if agent.bootstrap_etcd:
                boot.update(cert_file=str(d / pki.SERVER_CERT), key_file=str(d / pki.SERVER_KEY))
        if boot:
            doc["bootstrap_etcd"] = boot
        return doc

    def argv(self, agent: LocalAgent) -> list[str]:
        argv = [
            sys.executable, "-m", "agent.main", "--config", str(agent.state_dir / "agent.yaml"),
            "--name", agent.name, "--ip", agent.ip, "--cluster", self.cluster,
            "--listen", f"{agent.ip}:{agent.api_port}", "--state-dir", str(agent.state_dir),
            "--ttl", str(self.ttl), "--accelerators", "8",
        ]
        if self.etcd_members == 1:  # else the member list in the configuration file says it all
            argv += ["--etcd", self.etcd_endpoint]
        if agent.bootstrap_etcd and self.etcd_members == 1:
            argv += ["--bootstrap-etcd", "--etcd-client-port", str(self.etcd_port),
                     "--etcd-peer-port", str(self.etcd_peer_port)]
        return argv

    def start_agent(self, agent: LocalAgent) -> None:
        private_dir(agent.state_dir)
        if self.tls:
            self.make_pki()
        if self.token:
            self.make_token()
        atomic_write(agent.state_dir / "agent.yaml", yaml.safe_dump(self.config(agent)).encode(), 0o600)
        env = {**os.environ, MARKER_ENV: self.marker}
        env.pop("NOTIFY_SOCKET", None)
        with open(agent.log_path, "ab") as log:
            # own session: a terminal's Ctrl-C reaches the demo, which stops the cluster in order,
            # not the agents behind its back
            agent.proc = subprocess.Popen(self.argv(agent), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> None:
        for agent in self.agents:
            self.start_agent(agent)

    async def boot(self, timeout: float, poll_s: float = 0.1) -> float:
        """Start every agent and wait until all are registered (`GET /nodes` on node1); seconds taken.

        BootError, naming the log to read, when an agent process exits or `timeout` passes first.
        """
        from aiohttp import ClientError

        from pdsupervisor.api.client import ApiError

        t0 = time.monotonic()
        self.start()
        client = self.client(timeout_s=3)
        registered: set[str] | None = None  # None: node1's API has not answered yet
        while True:
            for a in self.agents:
                if a.proc and a.proc.poll() is not None:
                    raise BootError(f"agent {a.name} exited with {a.proc.returncode}; see {a.log_path}")
            with contextlib.suppress(OSError, ClientError, ApiError, asyncio.TimeoutError):  # 503 while etcd comes up
                registered = {n.name for n in (await client.nodes()).nodes}
                if registered >= {a.name for a in self.agents}:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                if registered is None:
                    raise BootError(f"agent {self.agents[0].name} did not answer on {client.base_url} "
                                    f"in {timeout:g}s; see {self.agents[0].log_path}")
                missing = ", ".join(a.name for a in self.agents if a.name not in registered)
                raise BootError(f"agents not registered in etcd after {timeout:g}s: {missing}; "
                                f"see {self.root}/<node>/agent.log")
            await asyncio.sleep(poll_s)

    def stop_agents(self, timeout: float = 10) -> None:
        """SIGTERM every agent (they leave their processes running) and wait for them."""
        for agent in self.agents:
            if agent.proc and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents:
            if agent.proc:
                try:
                    agent.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait(5)

    def processes(self) -> list[psutil.Process]:
        """Every live process carrying this cluster's marker (agents, etcd, engines...)."""
        return marked_processes(MARKER_ENV, self.marker)

    def kill_all(self, grace_s: float = 5.0) -> list[psutil.Process]:
        """SIGTERM, then SIGKILL, whatever of this cluster is still alive; returns what was left."""
        left = self.processes()
        signal_all(left, signal.SIGTERM)
        _, alive = psutil.wait_procs(left, timeout=grace_s)
        signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace_s)
        return left
