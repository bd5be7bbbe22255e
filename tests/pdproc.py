"""Helpers for tests that run the sim engine and the proxy as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree
from tests.conftest import wait_for


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def metric(base: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) from a Prometheus endpoint (which must answer)."""
    status, text = http("GET", base + "/metrics")
    # `http` maps a refused connection to status 0: a dead engine must not read as "no samples"
    assert status == 200, f"GET {base}/metrics answered {status}: {text[:300]!r}"
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Procs:
    """Starts processes in their own session and kills every tree at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}

    def run(self, argv: list[str], env: dict[str, str] | None = None, name: str = "p") -> subprocess.Popen[bytes]:
        path = self.tmp / f"{name}-{len(self.procs)}.log"
        with open(path, "wb") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        self.procs.append(p)
        self._logs[p.pid] = path
        return p

    def start(self, module: str, args: list[str], env: dict[str, str] | None = None, name: str = "p") -> subprocess.Popen[bytes]:
        return self.run([sys.executable, "-m", module, *args], env, name)

    def log(self, p: subprocess.Popen[bytes]) -> str:
        """The end of a started process's output, for assertion messages."""
        return self._logs[p.pid].read_text(errors="replace")[-3000:]

    def engine(self, role: str | None = None, *extra: str, env: dict[str, str] | None = None, wait: bool = True,
               port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
        port = port or free_port()
        args = ["--model", "sim-model", "--host", "127.0.0.1", "--port", str(port), *extra]
        if role:
            kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
            args += ["--kv-transfer-config", json.dumps({"kv_connector": "MooncakeStoreConnector", "kv_role": kv_role})]
        p = self.start("pdsupervisor.simengine", args, env=env, name=f"engine-{role}")
        ep = f"127.0.0.1:{port}"
        if wait:
            wait_up(ep, p, log=lambda: self.log(p))
        return ep, p

    def proxy(self, *args: str, wait: bool = True) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        argv = ["--host", "127.0.0.1", "--port", str(port), "--probe-interval", "0.2", *args]
        p = self.start("pdsupervisor.proxy", argv, name="proxy")
        base = f"http://127.0.0.1:{port}"
        if wait:
            wait_for(lambda: http("GET", base + "/status")[0] == 200 or _dead(p), timeout=15, what="proxy to listen")
            assert p.poll() is None, "proxy exited"
        return base, p

    def kill_all(self) -> None:
        """Kill every tree; one process that will not die does not leave the later ones running."""
        stuck = []
        for p in self.procs:
            kill_tree(p.pid)  # SIGKILL: nothing stronger is left to send
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stuck.append(p.pid)
        assert not stuck, f"processes still running after SIGKILL: {stuck}"


def _dead(p: subprocess.Popen[bytes]) -> bool:
    return p.poll() is not None


def wait_up(ep: str, p: subprocess.Popen[bytes], timeout: float = 15, log: Callable[[], str] | None = None) -> None:
    """Wait until the engine at `ep` answers /health; fail (with `log()`, if given) if it exits first."""
    wait_for(lambda: http("GET", f"http://{ep}/health", timeout=2)[0] == 200 or _dead(p), timeout=timeout,
             what=f"engine {ep}")
    assert p.poll() is None, f"engine {ep} exited" + (f":\n{log()}" if log else "")


__all__ = ["Procs", "free_port", "http", "metric", "wait_for", "wait_up"]
