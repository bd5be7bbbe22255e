"""pd-agent's REST listen address and token file, as a real process: loopback only without a
credential, a configuration error (exit 2, naming what to fix) for anything unsafe or unreadable."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from pdsupervisor.local.ports import free_port
from tests.agent_helpers import ROOT, AgentProc, kill_marked
from tests.conftest import wait_for


@pytest.fixture
def agents(tmp_path, etcd_server, cluster_name):
    started: list[AgentProc] = []

    def start(**kw) -> AgentProc:
        a = AgentProc(tmp_path, etcd_server.endpoint, cluster_name, name=f"n{len(started) + 1}", **kw)
        started.append(a)
        a.start()
        return a

    yield start
    for a in started:
        if a.proc and a.proc.poll() is None:
            a.sigterm()
        kill_marked(a.marker)


def listening(a: AgentProc) -> tuple[str, int]:
    """The address the agent's REST socket listens on (read from the kernel, not from its log)."""
    assert a.proc

    def find():
        conns = psutil.Process(a.proc.pid).net_connections(kind="tcp")
        return next((c.laddr for c in conns if c.status == psutil.CONN_LISTEN), None)

    laddr = wait_for(find, 20, what=f"agent {a.name} listening\n{a.logs()}")
    return laddr.ip, laddr.port


def agent_exit(*args: str) -> subprocess.CompletedProcess[str]:
    """Run pd-agent with `args`, which must make it exit before it contacts etcd."""
    argv = [sys.executable, "-m", "agent.main", "--name", "x", "--etcd", "127.0.0.1:1", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_no_credential_listens_on_loopback_and_says_so(agents):
    a = agents(listen=":{port}")  # no host given: the default
    assert listening(a) == ("127.0.0.1", a.port)
    wait_for(lambda: a.get("/healthz"), 20, what="the API to answer")
    assert "no REST credential configured: listening on 127.0.0.1 (loopback) only" in a.log_path.read_text()


def test_a_token_makes_the_default_every_interface(agents, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    a = agents(listen=":{port}", extra=["--token-file", str(token)])
    assert listening(a) == ("0.0.0.0", a.port)
    wait_for(lambda: a.get("/healthz"), 20, what="the API to answer")
    log = a.log_path.read_text()
    assert "no REST credential" not in log and "chmod 600" not in log


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "node1.example"])
def test_non_loopback_listen_without_credential_is_exit_2(host):
    out = agent_exit("--listen", f"{host}:{free_port()}")
    assert out.returncode == 2, out.stderr
    assert "rest.host / --listen" in out.stderr and "is not a loopback address" in out.stderr
    assert "--token-file" in out.stderr and "127.0.0.1" in out.stderr  # how to fix it
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_token_file_is_exit_2_naming_it(tmp_path, content):
    token = tmp_path / "token"
    token.write_text(content)
    out = agent_exit("--listen", f"127.0.0.1:{free_port()}", "--token-file", str(token))
    assert out.returncode == 2 and f"token_file {token} is empty" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_missing_token_file_is_exit_2_naming_it(tmp_path):
    token = tmp_path / "nope"
    out = agent_exit("--token-file", str(token))
    assert out.returncode == 2 and f"token_file {token}: No such file or directory" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_group_readable_token_file_is_a_warning_at_start(agents, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o640)
    a = agents(extra=["--token-file", str(token)])
    wait_for(lambda: a.get("/healthz"), 20, what="the API to answer")
    assert f"token file {token} is open to group or others (mode 640): run `chmod 600 {token}`" in a.log_path.read_text()
