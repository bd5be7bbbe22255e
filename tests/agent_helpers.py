"""Helpers for the agent tests: run `pd-agent` as a real subprocess, and clean up after it.

Every agent started here gets a unique PD_TEST_MARKER in its environment; children inherit
it, so teardown finds and kills every process of the test (grandchildren that called setsid
and orphans of a kill -9'd agent included), even when the test failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import psutil

from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree, marked_processes

ROOT = Path(__file__).resolve().parent.parent
TEST_MARKER_ENV = "PD_TEST_MARKER"

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
# A child that starts a grandchild in its own session (setsid) and another in its group;
# it writes both pids to the file named by its first argument.
TREE = (
    "import os, subprocess, sys, time\n"
    "a = subprocess.Popen([sys.executable, '-c', 'import os,time; os.setsid(); time.sleep(600)'])\n"
    "b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open(sys.argv[1], 'w').write(f'{a.pid} {b.pid}')\n"
    "time.sleep(600)\n"
)


class AgentProc:
    def __init__(self, tmp: Path, etcd: str, cluster: str, name: str = "n1", ttl: int = 2,
                 marker: str | None = None, extra: list[str] | None = None, state_dir: Path | None = None,
                 env: dict[str, str] | None = None, listen: str | None = None) -> None:
        self.env = env or {}
        self.name = name
        self.cluster = cluster
        self.etcd = etcd
        self.ttl = ttl
        self.marker = marker or uuid.uuid4().hex
        self.state_dir = state_dir or tmp / f"state-{name}"
        self.port = free_port()
        self.listen = listen or "127.0.0.1:{port}"  # --listen; {port} is self.port
        self.extra = extra or []
        self.log_path = tmp / f"agent-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AgentProc:
        argv = [sys.executable, "-m", "agent.main", "--name", self.name, "--ip", "127.0.0.1",
                "--etcd", self.etcd, "--cluster", self.cluster, "--listen", self.listen.format(port=self.port),
                "--state-dir", str(self.state_dir), "--ttl", str(self.ttl), "--accelerators", "0",
                "--log-level", "debug", *self.extra]
        env = {**os.environ, **self.env, TEST_MARKER_ENV: self.marker, "PYTHONPATH": str(ROOT)}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        return self

    def sigterm(self, timeout: float = 10) -> int:
        """SIGTERM, then the exit code; a hang fails with the agent's log (it names a stuck task)."""
        assert self.proc
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {self.name} still running {timeout}s after SIGTERM:\n{self.logs()}") from None

    def kill9(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def get(self, path: str) -> dict | str | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                body = r.read().decode()
                return json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except OSError:
            return None

    def local_procs(self) -> dict[str, dict]:
        st = self.get("/status")
        return {p["name"]: p for p in st["processes"]} if isinstance(st, dict) else {}

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def marked(marker: str) -> list[psutil.Process]:
    """Every live process of one test (its agents and all they started)."""
    return marked_processes(TEST_MARKER_ENV, marker)


def kill_marked(marker: str) -> None:
    """SIGKILL every process carrying the marker in its environment."""
    for p in marked(marker):
        kill_tree(p.pid)


def run(coro):
    return asyncio.run(coro)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
