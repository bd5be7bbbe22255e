"""`pdsupervisor demo` end to end: ready, a second demo refused clearly, Ctrl-C stops it in order
and leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from pdsupervisor.local.cluster import LocalCluster
from tests.agent_helpers import TEST_MARKER_ENV, kill_marked, marked
from tests.conftest import wait_for
from tests.pdproc import http

pytestmark = pytest.mark.slow
DEMO_API = f"http://127.0.0.1:{LocalCluster.api_base_port}"  # the demo's first agent


def _phase() -> str | None:
    status, body = http("GET", f"{DEMO_API}/cluster", timeout=2)
    return json.loads(body)["phase"] if status == 200 else None


def test_demo_runs_refuses_a_second_and_stops_clean(tmp_path):
    state = tmp_path / "demo"
    argv = [sys.executable, "-m", "pdsupervisor", "demo", "--state-dir", str(state)]
    out = open(tmp_path / "demo.out", "wb")
    marker = uuid.uuid4().hex  # inherited by everything the demo starts: found whatever happens
    env = {**os.environ, "COLUMNS": "200", TEST_MARKER_ENV: marker}
    demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group, like a terminal's job
    try:
        wait_for(lambda: _phase() == "ready", 90, 0.2, what="demo ready")
        wait_for(lambda: b"one completion through the proxy" in (tmp_path / "demo.out").read_bytes(), 20,
                 what="the demo's completion")
        # the same marker: anything a second demo wrongly started is found (and killed) too
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode == 1
        assert "a demo is already running" in second.stdout + second.stderr
        assert _phase() == "ready"  # the second attempt touched nothing

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets it
        assert demo.wait(60) == 0
        text = (tmp_path / "demo.out").read_text()
        assert "stopped: members 3" in text
        assert marked(marker) == []
    finally:
        if demo.poll() is None:
            demo.kill()
        kill_marked(marker)
        out.close()


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
    assert out.returncode == 1
    assert f"{spec}: invalid" in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "demo" / "run").exists()
