"""`--workers N`: N proxy processes on one port, children of the process started, which
supervises them (pdsupervisor/proxy/workers.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil

from tests.pdproc import http, metric, wait_for


def _workers(p) -> set[int]:
    return {c.pid for c in psutil.Process(p.pid).children()}


def _two_workers(p, port: int | None = None, not_: int | None = None) -> set[int] | None:
    """Its two workers' pids, once it has two (listening on `port`, none of them `not_`)."""
    w = _workers(p)
    if len(w) != 2 or not_ in w or (port is not None and not all(_listeners(x, port) for x in w)):
        return None
    return w


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _listeners(pid: int, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.Process(pid).net_connections("tcp"))


def test_two_workers_serve_one_port_and_sigterm_to_the_parent_leaves_none(procs):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"pdproxy-workers-{dead.pid}-test"  # a killed parent's
    stale.mkdir()
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode")
    base, p = procs.proxy("--prefill", pre, "--decode", dec, "--workers", "2")
    assert not stale.exists()
    ours = list(Path(tempfile.gettempdir()).glob(f"pdproxy-workers-{p.pid}-*"))
    assert len(ours) == 1
    port = int(base.rsplit(":", 1)[1])
    workers = wait_for(lambda: _two_workers(p, port), timeout=15, what="two workers listening")
    assert not _listeners(p.pid, port)  # the parent only supervises
    # each request on a new connection: the kernel spreads them over both workers
    answered = {json.loads(http("GET", base + "/status")[1])["pid"] for _ in range(40)}
    assert answered == workers
    for _ in range(10):
        assert http("POST", base + "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    # whichever worker answers the scrape, it counts the whole proxy's requests
    wait_for(lambda: all(metric(base, "pdproxy_requests_total") == 10 for _ in range(6)), timeout=10,
             what="both workers' counts in every scrape")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=15) == 0, procs.log(p)
    assert all(_gone(w) for w in workers)
    assert not ours[0].exists()
    assert "Traceback" not in procs.log(p), procs.log(p)


def test_a_dead_worker_is_replaced_and_a_dead_parent_takes_the_workers_along(procs):
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode")
    base, p = procs.proxy("--prefill", pre, "--decode", dec, "--workers", "2")
    workers = wait_for(lambda: _two_workers(p), timeout=15, what="two workers")
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    now = wait_for(lambda: _two_workers(p, not_=victim), timeout=15, what="the killed worker replaced")
    wait_for(lambda: all(http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200 for _ in range(10)),
             timeout=15, what="both workers serving")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=5)
    wait_for(lambda: all(_gone(w) for w in now), timeout=10, what="the workers to stop without their parent")
