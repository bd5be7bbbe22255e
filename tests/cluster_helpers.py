"""A multi-agent cluster on one machine: agents as real processes on 127.0.0.x, simulated engines."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdsupervisor.api.client import DEFAULT_API
from pdsupervisor.local.ports import free_port
from tests.agent_helpers import TEST_MARKER_ENV, AgentProc, kill_marked, marked
from tests.conftest import wait_for
from tests.pdproc import http

HAVE_MASTER = shutil.which("mooncake_master") is not None
HAVE_MOONCAKE = HAVE_MASTER and importlib.util.find_spec("mooncake") is not None

# Engines in `--sim-kv-transfer mooncake` mode: caps on the JSON's production sizes (the store
# allocates its whole segment at start-up) and the transfer engine's address on the node's IP.
MOONCAKE_KV_ENV = {"PDSIM_MOONCAKE_SEGMENT_CAP": "16MiB", "PDSIM_MOONCAKE_BUFFER_CAP": "2MiB",
                   "MC_TCP_BIND_ADDRESS": "{node_ip}"}


def sim_argv(kv_role: str, mooncake_kv: bool = False) -> list[str]:
    return ["{python}", "-m", "pdsupervisor.simengine", "--model", "{model}", "--host", "{host}", "--port", "{port}",
            "-tp", "{tp}", "--max-num-seqs", "32", *(["--sim-kv-transfer", "mooncake"] if mooncake_kv else []),
            "--kv-transfer-config", json.dumps({"kv_connector": "MooncakeStoreConnector", "kv_role": kv_role})]


def cluster_spec(cluster: str, etcd: str, *, decode_nodes: list[str], spare: list[str] | None = None,
                 ttl: int = 3, mooncake_kv: bool = False) -> dict[str, Any]:
    """1 prefill node (n1, 1 engine) and decode nodes with 2 engines each, one DP group.

    `mooncake_kv`: engines hand KV over through the real Mooncake Store (needs HAVE_MOONCAKE).
    """
    readiness = {"path": "/health", "period_s": 0.1}
    return {
        "cluster": cluster,
        "model": "sim-model",
        "engine_env": {"SHARED_FLAG": "on", **(MOONCAKE_KV_ENV if mooncake_kv else {})},
        "etcd": {"endpoints": [etcd]},
        "mooncake": {
            "enabled": HAVE_MASTER, "protocol": "tcp", "gc_args": [], "port": free_port(),
            "extra_args": ["-rpc_address", "{node_ip}", "-metrics_host", "{node_ip}", "-metrics_port", str(free_port()),
                           "-rpc_thread_num", "2"],
        },
        "prefill": {"node_names": ["n1"], "tp": 1, "slots": 1, "base_port": free_port(),
                    "argv": sim_argv("kv_producer", mooncake_kv), "readiness": readiness, "stop_timeout_s": 5},
        "decode": {"node_names": decode_nodes, "tp": 1, "slots": 2, "base_port": free_port(span=2),
                   "dp_master_port": free_port(),
                   "argv": sim_argv("kv_consumer", mooncake_kv), "readiness": readiness, "stop_timeout_s": 5},
        "proxy": {"kind": "builtin", "port": free_port()},
        "policy": {"node_loss": "replace" if spare else "wait", "spare_nodes": spare or [], "lease_ttl_s": ttl,
                   "node_loss_grace_s": 1,
                   "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 2}},
        "host_requirements": {"thp_mode": None},
    }


class AgentCluster:
    """Agents n1..nN on 127.0.0.1..N sharing the test's etcd; every process carries one marker.

    Unlike the product's `pdsupervisor.local.cluster.LocalCluster` (the demo's: it boots its
    own etcd and stops everything in order), this harness takes one agent at a time through
    what failure tests need: start, restart under the same state dir, SIGTERM, kill -9.
    """

    def __init__(self, tmp: Path, etcd: str, cluster: str, names: list[str], ttl: int = 3, token_file: Path | None = None):
        self.tmp, self.etcd, self.cluster, self.ttl = tmp, etcd, cluster, ttl
        self.marker = uuid.uuid4().hex
        self.token_file = token_file
        self.agents: dict[str, AgentProc] = {}
        for i, name in enumerate(names):
            self.agents[name] = self._make(name, i + 1)

    def _make(self, name: str, index: int) -> AgentProc:
        extra = ["--ip", f"127.0.0.{index}", "--log-level", "info"]
        if self.token_file:
            extra += ["--token-file", str(self.token_file)]
        return AgentProc(self.tmp, self.etcd, self.cluster, name=name, ttl=self.ttl, marker=self.marker, extra=extra)

    def start(self, *names: str) -> None:
        for name in names or tuple(self.agents):
            self.agents[name].start()
        for name in names or tuple(self.agents):
            wait_for(lambda n=name: self.agents[n].get("/healthz"), 20, what=f"agent {name} to answer")

    def restart(self, name: str) -> None:
        """A new agent process with the same state dir and port (as systemd would)."""
        old = self.agents[name]
        new = AgentProc(self.tmp, self.etcd, self.cluster, name=name, ttl=self.ttl, marker=self.marker,
                        extra=old.extra, state_dir=old.state_dir)
        new.port = old.port
        self.agents[name] = new
        self.start(name)

    def api(self, name: str | None = None) -> str:
        agent = self.agents[name] if name else next(a for a in self.agents.values() if a.proc and a.proc.poll() is None)
        return agent.url

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
                via: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/yaml"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = self.api(via) + path
        status, raw = http(method, url, body, headers, timeout=10)
        assert status, f"{method} {url}: no answer"
        return status, json.loads(raw or b"null")

    def submit(self, spec: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
        return self.request("POST", "/cluster/start", yaml.safe_dump(spec).encode(), token=token)

    def doc(self) -> dict[str, Any]:
        return self.request("GET", "/cluster")[1]

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> bool:
            nonlocal last
            last = self.doc()
            return last.get("phase") == phase

        try:
            wait_for(check, timeout, 0.1, what=f"phase {phase}")
        except AssertionError:
            raise AssertionError(f"phase not {phase}: {json.dumps(last, indent=1)[:3000]}\n"
                                 + "\n".join(a.logs()[-1500:] for a in self.agents.values())) from None
        return last

    def close(self) -> None:
        for agent in self.agents.values():
            if agent.proc and agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait(5)
        kill_marked(self.marker)


def _json_ok(method: str, url: str, payload: Any = None, timeout: float = 10) -> Any:
    status, raw = http(method, url, payload, timeout=timeout)
    assert 200 <= status < 300, f"{method} {url} answered {status}: {raw[:500]!r}"
    return json.loads(raw)


def get_json(url: str, timeout: float = 5) -> Any:
    return _json_ok("GET", url, timeout=timeout)


def post_json(url: str, payload: dict[str, Any], timeout: float = 10) -> Any:
    return _json_ok("POST", url, payload, timeout=timeout)


def wait_proxy_routes(doc: dict[str, Any], timeout: float = 15) -> dict[str, set[str]]:
    """Wait until the proxy routes to exactly the engines `doc` lists as ready, none ejected.

    The cluster document and the proxy both follow etcd, each on its own watch: when the
    document says `ready`, the proxy may still be one refresh behind (tens of ms, more on a
    loaded machine). Returns the routing seen.
    """
    wanted = {role: {p["endpoint"] for p in doc["processes"] if p["role"] == role and p["state"] == "ready"}
              for role in ("prefill", "decode")}
    seen: dict[str, set[str]] = {}

    def routed() -> bool:
        nonlocal seen
        code, raw = http("GET", doc["proxy_url"] + "/status")
        if code != 200:  # a hiccup is polled again, not a failure
            return False
        seen = {role: {i["endpoint"] for i in json.loads(raw)["instances"] if i["role"] == role and not i["ejected"]}
                for role in wanted}
        return seen == wanted

    wait_for(routed, timeout, 0.05, what=f"the proxy to route to {wanted} (last seen {seen})")
    return seen


def ready_pids(doc: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(p["node"], p["name"]): p["pid"] for p in doc["processes"] if p["state"] == "ready"}


def private_token(directory: Path, token: str) -> Path:
    """A token file as an operator makes it (mode 0600: the agent warns about any other)."""
    path = directory / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def single_agent(tmp: Path, etcd: str, cluster: str, *, token_file: Path | None = None,
                 log_text: str | None = None) -> Iterator[AgentCluster]:
    """One agent n1 on 127.0.0.1, started and answering; `log_text` becomes its process log
    `p.log` (what /logs serves); the whole tree is killed however the block ends."""
    c = AgentCluster(tmp, etcd, cluster, ["n1"], ttl=3, token_file=token_file)
    try:
        c.start()
        if log_text is not None:
            (c.agents["n1"].state_dir / "logs" / "p.log").write_text(log_text)
        yield c
    finally:
        c.close()


def demo_phase() -> str | None:
    """The running demo's phase (its first agent is on the CLI's default API), None while it
    does not answer."""
    status, body = http("GET", f"{DEFAULT_API}/cluster", timeout=3)
    return json.loads(body)["phase"] if status == 200 else None


@dataclass
class DemoRun:
    """A `pdsupervisor demo` under test: its process, the marker all its processes inherit,
    the env it runs with (a second demo gets the same), and where its output goes."""

    proc: subprocess.Popen[bytes]
    marker: str
    env: dict[str, str]
    out_path: Path


@contextlib.contextmanager
def running_demo(state: Path, out_path: Path) -> Iterator[DemoRun]:
    """Start the demo in its own process group (a terminal's job), its output in `out_path`;
    after the block, Ctrl-C it and check it exits 0 leaving nothing marked; whatever happens,
    kill what is left."""
    marker = uuid.uuid4().hex  # inherited by everything the demo starts: found whatever happens
    env = {**os.environ, "COLUMNS": "200", TEST_MARKER_ENV: marker}
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdsupervisor", "demo", "--state-dir", str(state)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield DemoRun(proc, marker, env, out_path)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets it
            assert proc.wait(60) == 0, out_path.read_text(errors="replace")[-3000:]
            assert marked(marker) == []
        finally:
            if proc.poll() is None:
                proc.kill()
            kill_marked(marker)
