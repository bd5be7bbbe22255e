"""`pdsupervisor demo` end to end: ready, its etcd only for its own certificates, the CLI's
defaults reach it, a second demo refused clearly, Ctrl-C stops it in order and leaves nothing;
a planted symlink is refused; a Mooncake master that cannot run here is left out, saying why."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pdsupervisor.api.client import DEFAULT_API
from pdsupervisor.store.etcd import Store, StoreUnavailable
from pdsupervisor.store.transport import client_ssl_context
from tests.agent_helpers import TEST_MARKER_ENV, kill_marked, marked
from tests.cluster_helpers import demo_phase, running_demo
from tests.conftest import wait_for
from tests.pdproc import http

pytestmark = pytest.mark.slow
DEMO_API = DEFAULT_API  # the demo's first agent: where the CLI looks by default


def test_demo_runs_refuses_a_second_and_stops_clean(tmp_path):
    state = tmp_path / "demo"
    argv = [sys.executable, "-m", "pdsupervisor", "demo", "--state-dir", str(state)]
    with running_demo(state, tmp_path / "demo.out") as demo:
        wait_for(lambda: demo_phase() == "ready", 90, 0.2, what="demo ready")
        wait_for(lambda: b"one completion through the proxy" in (tmp_path / "demo.out").read_bytes(), 20,
                 what="the demo's completion")
        _check_etcd_wants_a_client_certificate(state / "run" / "pki")
        _check_writes_want_the_demo_token(state / "run" / "token")
        wait_for(lambda: b"--cert" in (tmp_path / "demo.out").read_bytes(), 20, what="how to reach etcd, printed")
        _check_the_cli_reaches_it_as_printed(state / "run" / "token", (tmp_path / "demo.out").read_text())
        # the same marker: anything a second demo wrongly started is found (and killed) too
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=demo.env)
        assert second.returncode == 1
        assert "a demo is already running" in second.stdout + second.stderr
        assert demo_phase() == "ready"  # the second attempt touched nothing
    # stopped by Ctrl-C: exit 0 and nothing left (running_demo checks both)
    assert "stopped: members 3" in (tmp_path / "demo.out").read_text()


def _check_writes_want_the_demo_token(token_file: Path) -> None:
    """The demo's API: a write without the token changes nothing; the token (0600, in the
    private state dir, the path printed for the CLI) is what lets one through."""
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    status, _ = http("POST", f"{DEMO_API}/cluster/stop", headers={"Content-Type": "application/json"})
    assert status == 401 and demo_phase() == "ready"
    status, body = http("GET", f"{DEMO_API}/logs/prefill-0", timeout=5)
    assert status == 401, body
    token = token_file.read_text().strip()
    status, body = http("GET", f"{DEMO_API}/logs/prefill-0?tail=5", headers={"Authorization": f"Bearer {token}"},
                        timeout=5)
    assert status == 200, body


def _check_the_cli_reaches_it_as_printed(token_file: Path, printed: str) -> None:
    """Plain `pdsupervisor status` (no variables) reads the demo; logs take the token file the
    demo printed, and only that variable (the API is the default one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSUPERVISOR_")}
    env["COLUMNS"] = "200"
    cli = [sys.executable, "-m", "pdsupervisor"]
    status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=30, env=env)
    assert status.returncode == 0 and "phase: ready" in status.stdout, status.stdout + status.stderr
    assert f"export PDSUPERVISOR_TOKEN_FILE={token_file}" in printed and "PDSUPERVISOR_API" not in printed
    denied = subprocess.run([*cli, "logs", "node1", "prefill-0", "-n", "3"], capture_output=True, text=True,
                            timeout=30, env=env)
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr, denied.stderr
    logs = subprocess.run([*cli, "logs", "node1", "prefill-0", "-n", "3"], capture_output=True, text=True, timeout=30,
                          env={**env, "PDSUPERVISOR_TOKEN_FILE": str(token_file)})
    assert logs.returncode == 0, logs.stderr


def _check_etcd_wants_a_client_certificate(pki_dir: Path) -> None:
    """The demo's etcd: TLS with client certificates of the demo's own CA, nothing else."""
    admin = pki_dir / "clients" / "admin"

    async def members(endpoint: str, tls: ssl.SSLContext | None) -> set[str]:
        async with Store([endpoint], "demo", tls=tls, timeout_s=3) as store:
            return set(await store.members())
    full = client_ssl_context(str(admin / "ca.crt"), str(admin / "client.crt"), str(admin / "client.key"))
    assert asyncio.run(members("127.0.0.1:2379", full)) == {"node1", "node2", "node3"}
    for endpoint, tls in (("http://127.0.0.1:2379", None), ("127.0.0.1:2379", client_ssl_context(str(admin / "ca.crt")))):
        with pytest.raises(StoreUnavailable):
            asyncio.run(members(endpoint, tls))
    assert stat.S_IMODE((pki_dir / "ca.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("planted", ["state dir", "lock"])
def test_demo_refuses_a_planted_symlink_and_touches_nothing(tmp_path, planted):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("precious")
    state = tmp_path / "demo"
    if planted == "state dir":
        state.symlink_to(victim)
    else:
        state.mkdir(mode=0o700)
        (state / "demo.lock").symlink_to(victim / "file")
    marker = uuid.uuid4().hex
    argv = [sys.executable, "-m", "pdsupervisor", "demo", "--state-dir", str(state), "--timeout", "20"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, TEST_MARKER_ENV: marker})
    finally:
        kill_marked(marker)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 1 and "symbolic link" in text, text
    assert sorted(p.name for p in victim.iterdir()) == ["file"] and (victim / "file").read_text() == "precious"
    assert marked(marker) == []


def test_demo_refuses_a_state_dir_others_can_write(tmp_path):
    state = tmp_path / "demo"
    state.mkdir()
    state.chmod(0o777)
    out = subprocess.run([sys.executable, "-m", "pdsupervisor", "demo", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "writable by group or others" in " ".join((out.stdout + out.stderr).split())
    assert list(state.iterdir()) == []


def test_demo_refuses_a_taken_engine_port_before_starting_anything(tmp_path):
    import socket

    import yaml

    from pdsupervisor.cli.demo import REPO_DEMO_SPEC
    from pdsupervisor.local.ports import free_port

    doc = yaml.safe_load(REPO_DEMO_SPEC.read_text())
    port = free_port(span=2)
    doc["prefill"]["base_port"] = port  # prefill-0's port, held below
    spec = tmp_path / "demo.yaml"
    spec.write_text(yaml.safe_dump(doc))
    marker = uuid.uuid4().hex
    env = {**os.environ, "COLUMNS": "200", TEST_MARKER_ENV: marker}
    argv = [sys.executable, "-m", "pdsupervisor", "demo", "--spec", str(spec), "--state-dir", str(tmp_path / "demo"),
            "--timeout", "20", "--exit-when-ready"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen(1)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        finally:
            kill_marked(marker)
    text = " ".join((out.stdout + out.stderr).split())  # rich may wrap the message
    assert out.returncode == 1
    assert "ports already in use" in text and f"{port}" in text and "prefill-0" in text
    assert not (tmp_path / "demo" / "run").exists()  # nothing was started


@pytest.mark.parametrize("text", ["- a list\n- not a spec\n", "cluster: [unclosed\n", "cluster: demo\nprefil: {}\n"])
def test_demo_refuses_a_bad_spec_with_a_message_not_a_traceback(tmp_path, text):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    argv = [sys.executable, "-m", "pdsupervisor", "demo", "--spec", str(spec), "--state-dir", str(tmp_path / "demo")]
    marker = uuid.uuid4().hex  # were the check broken, whatever the demo started is found and killed
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, TEST_MARKER_ENV: marker})
    finally:
        kill_marked(marker)
    assert out.returncode == 2  # a bad spec exits 2 from every command
    assert f"{spec}: invalid" in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "demo" / "run").exists()


def test_demo_runs_without_a_master_that_cannot_run_and_says_why(tmp_path):
    """pip's mooncake_master without Debian's libibverbs1: installed (on PATH, where the demo and
    its agents look), but the loader refuses it with exit 127. The demo tries it once, leaves the
    master out, says why in one line and reaches ready; the agents never start it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "mooncake_master"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                    'echo "$0: error while loading shared libraries: libibverbs.so.1: cannot open shared object file: '
                    'No such file or directory" >&2\nexit 127\n')
    fake.chmod(0o755)
    marker = uuid.uuid4().hex
    env = {**os.environ, "COLUMNS": "200", TEST_MARKER_ENV: marker, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    argv = [sys.executable, "-m", "pdsupervisor", "demo", "--state-dir", str(tmp_path / "demo"), "--timeout", "60",
            "--exit-when-ready"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=150, env=env)
    finally:
        kill_marked(marker)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    reason = [line for line in text.splitlines() if "running without a Mooncake master" in line]
    assert reason == [f"running without a Mooncake master: {fake}: error while loading shared libraries: "
                      "libibverbs.so.1: cannot open shared object file: No such file or directory"], text
    assert "one completion through the proxy" in text and "mooncake-master" not in text
    assert calls.read_text() == "--help\n"  # the demo's try; no agent started it
    assert marked(marker) == []
