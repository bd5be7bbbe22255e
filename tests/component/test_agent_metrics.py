"""The agent's `GET /metrics`: an open read; on real agents against a real etcd, a supervised
process's state, restarts and exit code, registration, leadership, etcd reachability."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.api.app import build_app
from agent.config import AgentConfig, RestConfig
from agent.daemon import Agent
from pdsupervisor import __version__
from pdsupervisor.core.models import NodeAssignment, ProcessSpec, RestartPolicy
from pdsupervisor.store.etcd import Store
from tests.agent_helpers import SLEEP, AgentProc
from tests.cluster_helpers import AgentCluster
from tests.conftest import wait_for
from tests.monitoring_helpers import sample_names, used_metrics

FAST = RestartPolicy(initial_backoff_s=0.3, max_backoff_s=1.0, jitter=0.1, reset_after_s=30)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(agent: AgentProc) -> Samples:
    """Every sample of the agent's /metrics by (name, labels); empty when it does not answer."""
    text = agent.get("/metrics")
    if not isinstance(text, str):
        return {}
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def assign(c: AgentCluster, node: str, *specs: ProcessSpec) -> None:
    async def put() -> None:
        async with Store([c.etcd], c.cluster) as s:
            await s.put(s.keys.assignment(node), NodeAssignment(node=node, processes=list(specs)).model_dump_json().encode())
    asyncio.run(put())


def leader(c: AgentCluster) -> str | None:
    async def read() -> str | None:
        async with Store([c.etcd], c.cluster) as s:
            return await s.leader()
    return asyncio.run(read())


@pytest.fixture
def two(etcd_server, cluster_name, tmp_path) -> Iterator[AgentCluster]:
    """Agents n1 and n2, answering; every process of the test is killed in teardown."""
    c = AgentCluster(tmp_path, etcd_server.endpoint, cluster_name, ["n1", "n2"], ttl=2)
    try:
        c.start()
        yield c
    finally:
        try:
            etcd_server.resume()
        finally:
            c.close()


def test_a_killed_process_shows_its_restart_and_exit_code(two):
    n1 = two.agents["n1"]
    assign(two, "n1", ProcessSpec(name="s", role="decode", argv=SLEEP, restart=FAST, stop_timeout_s=3))
    proc = {"node": "n1", "process": "s", "role": "decode"}
    m = wait_for(lambda: value(s := scrape(n1), "pdsupervisor_process_ready", **proc) == 1 and s,
                 timeout=15, what="s ready in /metrics")
    assert value(m, "pdsupervisor_process_state", **proc, state="ready") == 1
    assert value(m, "pdsupervisor_process_state", **proc, state="backoff") == 0
    assert value(m, "pdsupervisor_process_restarts_total", **proc) == 0
    assert value(m, "pdsupervisor_process_last_exit_code", **proc) is None  # it never exited
    assert value(m, "pdsupervisor_process_uptime_seconds", **proc) >= 0

    os.kill(n1.local_procs()["s"]["pid"], signal.SIGKILL)
    m = wait_for(lambda: value(s := scrape(n1), "pdsupervisor_process_restarts_total", **proc) == 1
                 and value(s, "pdsupervisor_process_ready", **proc) == 1 and s, timeout=15, what="restart in /metrics")
    assert value(m, "pdsupervisor_process_last_exit_code", **proc) == -signal.SIGKILL
    assert value(m, "pdsupervisor_process_state", **proc, state="ready") == 1


def test_registration_leadership_and_etcd_requests(two):
    n1, n2 = two.agents["n1"], two.agents["n2"]
    for a in (n1, n2):
        wait_for(lambda a=a: value(scrape(a), "pdsupervisor_registered", node=a.name) == 1, what=f"{a.name} registered")
    holder = wait_for(lambda: leader(two), what="a leader")
    on = {"node": holder, "cluster": two.cluster}
    wait_for(lambda: value(scrape(two.agents[holder]), "pdsupervisor_coordinator_is_leader", **on) == 1,
             what="leader gauge on the leader")
    other = "n2" if holder == "n1" else "n1"
    off = scrape(two.agents[other])
    assert value(off, "pdsupervisor_coordinator_is_leader", node=other, cluster=two.cluster) == 0
    assert value(off, "pdsupervisor_coordinator_cycles_total", node=other, cluster=two.cluster, outcome="follower") >= 1
    # a leader without a spec: its view says so, and it has written nothing
    m = wait_for(lambda: value(s := scrape(two.agents[holder]), "pdsupervisor_cluster_phase", cluster=two.cluster,
                               phase="stopped") == 1 and s, what="the leader's phase")
    assert value(m, "pdsupervisor_coordinator_cycles_total", **on, outcome="acquired") >= 1
    assert value(m, "pdsupervisor_coordinator_assignment_writes_total", **on) == 0
    assert value(m, "pdsupervisor_coordinator_cycle_duration_seconds_count", **on) >= 1
    assert value(off, "pdsupervisor_cluster_phase", cluster=two.cluster, phase="stopped") is None  # leader only

    m = scrape(n1)
    assert value(m, "pdsupervisor_lease_ttl_seconds", node="n1") == 2
    assert 0 <= value(m, "pdsupervisor_lease_refresh_age_seconds", node="n1") < 10
    assert value(m, "pdsupervisor_etcd_reachable", node="n1") == 1
    assert value(m, "pdsupervisor_etcd_request_duration_seconds_count", node="n1", op="lease/grant") >= 1
    assert value(m, "pdsupervisor_etcd_request_duration_seconds_count", node="n1", op="kv/put") >= 1
    assert value(m, "pdsupervisor_agent_info", node="n1", cluster=two.cluster, version=__version__) == 1
    assert value(m, "process_resident_memory_bytes") > 0
    # what the shipped alerts and dashboard ask of an agent, a live one exports
    asked = {n for names in used_metrics().values() for n in names if not n.startswith("pdproxy_")}
    assert asked <= sample_names(n1.get("/metrics"))


def test_etcd_away_shows_unreachable_and_failed_requests(two, etcd_server):
    n1 = two.agents["n1"]
    wait_for(lambda: value(scrape(n1), "pdsupervisor_etcd_reachable", node="n1") == 1, what="etcd reachable")
    etcd_server.pause()
    try:
        # the leader decides from its cluster cache: it finds etcd away at its next lease refresh
        # (within one refresh interval), not necessarily before registration does
        m = wait_for(lambda: value(s := scrape(n1), "pdsupervisor_etcd_reachable", node="n1") == 0
                     and value(s, "pdsupervisor_coordinator_is_leader", node="n1", cluster=two.cluster) == 0 and s,
                     timeout=15, what="etcd unreachable and n1 not leading in /metrics")
        failed = sum(v for (name, labels), v in m.items() if name == "pdsupervisor_etcd_request_failures_total")
        assert failed >= 1
    finally:
        etcd_server.resume()
    wait_for(lambda: value(scrape(n1), "pdsupervisor_etcd_reachable", node="n1") == 1, timeout=15,
             what="etcd reachable again")


async def test_metrics_is_an_open_read_beside_a_token(aiohttp_client, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    cfg = AgentConfig(name="n1", ip="127.0.0.1", state_dir=str(tmp_path / "state"), etcd=["127.0.0.1:1"],
                      rest=RestConfig(port=0, token_file=str(tmp_path / "token")), sys_root=str(tmp_path))
    client = await aiohttp_client(build_app(Agent(cfg)))
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'pdsupervisor_registered{node="n1"} 0.0' in text
    assert 'pdsupervisor_coordinator_is_leader{cluster="default",node="n1"} 0.0' in text
