"""`--workers N`: N proxy processes on one port, children of the process started, which
supervises them (pdsupervisor/proxy/workers.py)."""

from __future__ import annotations

import asyncio
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


def test_each_worker_follows_etcd_on_its_own(procs, etcd_server, cluster_name):
    """Every worker has its own etcd watch: an engine joining reaches each worker's routing."""
    from tests.component.test_proxy_etcd import _register, engines_in_etcd

    etcd = etcd_server.endpoint
    _, dec1, dec2 = engines_in_etcd(procs, etcd, cluster_name)
    base, p = procs.proxy("--cluster", cluster_name, "--etcd", etcd, "--workers", "2")
    workers = wait_for(lambda: _two_workers(p), timeout=15, what="two workers")

    def decodes_by_worker() -> dict[int, list[str]]:
        seen: dict[int, list[str]] = {}
        for _ in range(30):
            st = json.loads(http("GET", base + "/status")[1] or b"{}")
            if "pid" in st:
                seen[st["pid"]] = sorted(i["endpoint"] for i in st["instances"] if i["role"] == "decode")
        return seen

    wait_for(lambda: decodes_by_worker() == {w: [dec1] for w in workers}, timeout=15, what="both workers route dec1")
    asyncio.run(_register(etcd, cluster_name, "node-c", "decode", dec2))
    wait_for(lambda: decodes_by_worker() == {w: sorted([dec1, dec2]) for w in workers}, timeout=15,
             what="dec2 in both workers' routing")
