"""A planned stop drains first: real sim engines, real streams, a real agent and etcd.

The engines stop with a 0.5 s timeout before SIGKILL: a stop while a ~6 s stream is in
flight would cut it, so a stream that ends with `data: [DONE]` was drained, not raced.
"""

from __future__ import annotations

import asyncio
import http.client as http_client
import sys
import threading
import time

from agent.process import drain
from pdsupervisor.core.models import DrainSpec, Probe, ProcessSpec, ProcessState, ProcessStatus, RestartPolicy
from pdsupervisor.local.ports import free_port
from tests.agent_helpers import SLEEP, alive
from tests.component import test_agent_daemon as daemon_tests
from tests.conftest import until, wait_for
from tests.pdproc import http, metric

env = daemon_tests.env  # the fixture: (view of etcd, factory of real agents), all killed after

FAST = RestartPolicy(initial_backoff_s=0.2, max_backoff_s=1.0, jitter=0.1, reset_after_s=30)
TPOT_S = 0.2


def engine(port: int, timeout_s: float) -> ProcessSpec:
    argv = [sys.executable, "-m", "pdsupervisor.simengine", "--model", "sim-model", "--host", "127.0.0.1",
            "--port", str(port), "--sim-tpot", str(TPOT_S)]
    return ProcessSpec(name="eng", role="decode", argv=argv, port=port, restart=FAST, stop_timeout_s=0.5,
                       readiness=Probe(port=port, path="/health", period_s=0.2), drain=DrainSpec(timeout_s=timeout_s))


class Stream(threading.Thread):
    """One streamed completion of `tokens` tokens (TPOT_S each), read to its end."""

    def __init__(self, port: int, tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.tokens = f"http://127.0.0.1:{port}", tokens
        self.body = b""
        self.start()

    def run(self) -> None:
        body = {"prompt": "x", "max_tokens": self.tokens, "ignore_eos": True, "stream": True}
        try:
            self.body = http("POST", self.base + "/v1/completions", body, timeout=60)[1]
        except http_client.IncompleteRead as cut:  # the engine went away mid-stream
            self.body = cut.partial

    def in_flight(self) -> bool:
        return metric(self.base, "vllm:num_requests_running") == 1

    def complete(self) -> bool:
        return self.body.decode().rstrip().endswith("data: [DONE]")


def test_a_dropped_engine_finishes_its_stream_before_it_is_stopped(env):
    view, agent = env
    agent()
    port = free_port()
    view.assign("n1", engine(port, timeout_s=30))
    pid = wait_for(lambda: (p := view.status("n1").get("eng", {})).get("state") == "ready" and p["pid"],
                   timeout=20, what="engine ready")
    stream = Stream(port, tokens=30)  # ~6 s
    wait_for(stream.in_flight, what="the stream in flight")
    view.unassign("n1")
    st = wait_for(lambda: (p := view.status("n1").get("eng", {})).get("state") == "stopping" and p,
                  what="the drain written to etcd")  # the proxy routes to ready processes only
    assert st["message"] == "draining: 1 requests in flight" and st["pid"] == pid
    assert alive(pid) and stream.is_alive()
    stream.join(30)
    assert stream.complete(), stream.body[-300:]
    wait_for(lambda: not alive(pid), what="the engine stopped after its stream")
    wait_for(lambda: view.status("n1") == {}, what="status emptied")


async def test_a_drain_is_cut_short_by_its_timeout(managed, tmp_path):
    port = free_port()
    m = managed(engine(port, timeout_s=1.5))
    pid = await until(lambda: m.state == ProcessState.ready and m.pid, timeout=20, what="engine ready")
    stream = Stream(port, tokens=100)  # ~20 s
    await until(stream.in_flight, what="the stream in flight")
    began = time.monotonic()
    await m.stop(drain=True)
    took = time.monotonic() - began
    assert 1.5 <= took < 1.5 + 0.5 + 6, took  # the drain's timeout, then the stop's; not the stream's 20 s
    assert not alive(pid) and m.state == ProcessState.exited
    await asyncio.to_thread(stream.join, 10)
    assert not stream.complete()  # cut: what a drain timeout means
    assert "drain cut short after 1.5 s with 1 requests in flight" in m.log_path.read_text()


async def test_a_process_that_never_served_is_not_drained(managed):
    spec = ProcessSpec(name="loading", role="decode", argv=SLEEP, port=free_port(), restart=FAST,
                       readiness=Probe(port=free_port(), period_s=0.2), drain=DrainSpec(timeout_s=30))
    seen: list[ProcessStatus] = []
    m = managed(spec, seen=seen)
    await until(lambda: m.state == ProcessState.running, what="running, not ready")
    began = time.monotonic()
    await m.stop(drain=True)
    assert time.monotonic() - began < 3 and m.state == ProcessState.exited
    assert not any(s.message.startswith("draining") for s in seen)


async def test_gauges_that_cannot_be_read_leave_only_a_grace(managed):
    port = free_port()  # nothing listens there: no metrics
    spec = ProcessSpec(name="quiet", role="decode", argv=SLEEP, port=port, restart=FAST, drain=DrainSpec(timeout_s=30))
    seen: list[ProcessStatus] = []
    m = managed(spec, seen=seen)
    await until(lambda: m.state == ProcessState.ready, what="ready (no probe)")
    began = time.monotonic()
    await m.stop(drain=True)
    assert drain.GRACE_S <= time.monotonic() - began < drain.GRACE_S + 3
    (draining,) = [s for s in seen if s.state == ProcessState.stopping and s.message.startswith("draining")]
    assert draining.message.startswith(f"draining: requests in flight unknown (GET http://127.0.0.1:{port}/metrics failed")
