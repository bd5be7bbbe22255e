"""A whole cluster: agents n1-n4 on 127.0.0.1-4, real etcd, real mooncake_master (when installed),
simulated engines, the built-in proxy. The tests run in order on one cluster, as an operator would:
start, lose the coordinator, lose a decode node, stop.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys

import psutil
import pytest
import yaml

from pdsupervisor.local.procs import kill_tree
from pdsupervisor.store.etcd import Store
from tests.agent_helpers import alive, kill_marked, marked, run
from tests.cluster_helpers import (
    HAVE_MASTER,
    HAVE_MOONCAKE,
    AgentCluster,
    cluster_spec,
    get_json,
    post_json,
    ready_pids,
    wait_proxy_routes,
)
from tests.conftest import wait_for

TTL = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(etcd_server, tmp_path_factory):
    name = f"clu-{id(tmp_path_factory) % 100000}"
    c = AgentCluster(tmp_path_factory.mktemp("cluster"), etcd_server.endpoint, name, ["n1", "n2", "n3", "n4"], ttl=TTL)
    # With Mooncake installed the engines hand KV over through the real store, reading the JSON
    # their agents wrote (test_mooncake_kv.py covers the details).
    c.spec = cluster_spec(name, etcd_server.endpoint, decode_nodes=["n2", "n3"], spare=["n4"], ttl=TTL,
                          mooncake_kv=HAVE_MOONCAKE)
    try:
        c.start("n4")  # n4 (the spare) starts first and becomes the coordinator
        wait_for(lambda: run(_leader(c)) == "n4", 15, what="n4 to lead")
        c.start("n1", "n2", "n3")
        yield c
    finally:
        c.close()


async def _leader(c: AgentCluster) -> str | None:
    async with Store([c.etcd], c.cluster) as store:
        return await store.leader()


async def _events(c: AgentCluster) -> list[dict]:
    async with Store([c.etcd], c.cluster) as store:
        return await store.events(500)


def test_start_reaches_ready_in_order(cluster):
    status, body = cluster.submit(cluster.spec)
    assert status == 202 and body["generation"] == 1

    # Invariant while starting: the proxy is never assigned before every engine is ready.
    def watch_start() -> bool:
        doc = cluster.doc()
        engines = [p for p in doc["processes"] if p["role"] in ("prefill", "decode")]
        proxy = next(p for p in doc["processes"] if p["role"] == "proxy")
        if proxy["state"] != "waiting":
            assert engines and all(p["state"] == "ready" for p in engines), doc
        if engines and any(p["state"] != "waiting" for p in engines) and HAVE_MASTER:
            master = next(p for p in doc["processes"] if p["role"] == "mooncake-master")
            assert master["state"] == "ready", doc
        return doc["phase"] == "ready"

    wait_for(watch_start, 60, 0.05, what="ready")
    doc = cluster.doc()
    placed = {(p["node"], p["name"]) for p in doc["processes"]}
    expected = {("n1", "prefill-0"), ("n1", "proxy"), ("n2", "decode-0"), ("n2", "decode-1"),
                ("n3", "decode-0"), ("n3", "decode-1")} | ({("n1", "mooncake-master")} if HAVE_MASTER else set())
    assert placed == expected
    assert doc["leader"] == "n4" and doc["missing"] == []

    # The plan reached the processes: each decode engine saw its DP env and Mooncake JSON.
    seen_ranks = {}
    for p in doc["processes"]:
        if p["role"] != "decode":
            continue
        cfg = get_json(f"http://{p['endpoint']}/debug/config")
        ip = p["endpoint"].split(":")[0]
        assert cfg["dp_env"]["VLLM_DP_SIZE"] == "4" and cfg["dp_env"]["VLLM_DP_MASTER_IP"] == "127.0.0.2"
        assert cfg["mooncake_config"]["local_hostname"] == ip
        assert cfg["mooncake_config"]["metadata_server"] == "P2PHANDSHAKE"  # never the control-plane etcd
        seen_ranks[(p["node"], p["name"])] = int(cfg["dp_env"]["VLLM_DP_RANK"])
        proc = psutil.Process(p["pid"])
        assert proc.environ()["SHARED_FLAG"] == "on"
    assert sorted(seen_ranks.values()) == [0, 1, 2, 3]
    assert seen_ranks[("n3", "decode-1")] == 3

    wait_proxy_routes(doc)  # the proxy follows etcd on its own watch
    answer = post_json(doc["proxy_url"] + "/v1/completions", {"model": "sim-model", "prompt": "hello", "max_tokens": 5})
    assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] == 5
    _assert_kv_handed_over(doc)

    kinds = [e["message"] for e in run(_events(cluster))]
    assert any("proxy released" in m for m in kinds)


def _assert_kv_handed_over(doc: dict) -> None:
    """With Mooncake: the last request's KV went prefill -> Mooncake Store -> a decode, verified."""
    if not HAVE_MOONCAKE:
        return
    prefill = next(p for p in doc["processes"] if p["role"] == "prefill")
    put = get_json(f"http://{prefill['endpoint']}/debug/kv")["last_put"]
    gets = [get_json(f"http://{p['endpoint']}/debug/kv")["last_get"] for p in doc["processes"] if p["role"] == "decode"]
    assert put and [g for g in gets if g and g["key"] == put["key"] and g["sha256_ok"]], (put, gets)


def _cli(cluster: AgentCluster, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdsupervisor", *args, "--api", cluster.api("n2")],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_status_events_and_logs(cluster):
    import json

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli(cluster, *args)

    table = cli("status")
    assert table.returncode == 0, table.stderr
    assert "phase: ready" in table.stdout and "leader: n4" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines() if line.startswith("n")]
    assert {(r[0], r[2], r[4]) for r in rows} >= {("n2", "decode-0", "ready"), ("n3", "decode-1", "ready")}
    doc = json.loads(cli("status", "-o", "json").stdout)
    assert doc["phase"] == "ready" and len(doc["processes"]) == len(rows)
    events = cli("events")
    assert "proxy released" in events.stdout and "n4 is the coordinator" in events.stdout
    logs = cli("logs", "n2", "decode-0", "--tail", "50")
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    missing = cli("logs", "n9", "decode-0")
    assert missing.returncode == 1 and "no registered node 'n9'" in missing.stderr


def test_resubmitting_another_spec_conflicts(cluster):
    other = dict(cluster.spec, model="other-model")
    status, body = cluster.submit(other)
    assert status == 409 and "stop it first" in body["error"]
    status, body = cluster.submit(cluster.spec)  # the same spec again is a no-op
    assert status == 202 and body["generation"] == 1


def test_coordinator_loss_changes_nothing(cluster):
    before = ready_pids(cluster.doc())
    cluster.agents["n4"].kill9()
    # the bound is loose: bench/failover.py measures the time to a new leader
    wait_for(lambda: run(_leader(cluster)) not in (None, "n4"), TTL + 8, 0.1, what="a new leader")
    doc = cluster.doc()
    assert doc["phase"] == "ready" and ready_pids(doc) == before, doc
    cluster.restart("n4")  # back as the spare for the next test
    wait_for(lambda: "n4" in cluster.doc()["members"], 15, what="n4 back")


def test_a_bad_rollout_halts_and_the_old_engines_keep_serving(cluster, tmp_path):
    """A decode argv[0] that does not exist: each decode node refuses the new spec before
    stopping anything; the rollout halts; `start --wait` exits 1 naming it; restoring the
    previous spec restarts nothing."""
    doc = cluster.doc()
    pids = {(p["node"], p["name"]): p["pid"] for p in doc["processes"]}
    bad = copy.deepcopy(cluster.spec)
    bad["decode"]["argv"] = ["/nonexistent/engine", *bad["decode"]["argv"][1:]]
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(bad))
    started = _cli(cluster, "start", "--replace", "--wait", "--timeout", "60", "-f", str(spec_file), timeout=90)
    assert started.returncode == 1, started.stdout + started.stderr
    assert "decode: the DP group of 4 ranks restarts as one unit" in started.stdout  # said beforehand
    assert "rollout halted: decode-" in started.stderr and "refused by its node" in started.stderr
    assert "argv[0] /nonexistent/engine does not exist" in started.stderr
    doc = cluster.doc()
    assert doc["rollout"]["state"] == "halted" and doc["phase"] == "degraded"
    assert {(p["node"], p["name"]): p["pid"] for p in doc["processes"]} == pids  # nothing was stopped
    answer = post_json(doc["proxy_url"] + "/v1/completions", {"model": "sim-model", "prompt": "still", "max_tokens": 2})
    assert answer["usage"]["completion_tokens"] == 2
    messages = [e["message"] for e in run(_events(cluster))]
    assert any(m.startswith("rollout halted: decode-") for m in messages)

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cluster.spec))
    restored = _cli(cluster, "start", "--replace", "--wait", "--timeout", "60", "-f", str(good), timeout=90)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    doc = cluster.doc()
    assert doc["rollout"] is None and {(p["node"], p["name"]): p["pid"] for p in doc["processes"]} == pids


def test_decode_node_loss_is_replaced_with_same_dp_ranks(cluster):
    doc = cluster.doc()
    lost_ranks = sorted(p["dp_rank"] for p in doc["processes"] if p["node"] == "n3")
    agent = cluster.agents["n3"]
    engine_pids = [p["pid"] for p in doc["processes"] if p["node"] == "n3"]
    kill_tree(agent.proc.pid)  # the node dies: agent and engines
    agent.proc.wait(5)
    assert not any(alive(pid) for pid in engine_pids)
    # figure measured by bench/failover.py; this only bounds it
    wait_for(lambda: cluster.doc()["phase"] == "degraded", TTL + 8, 0.05, what="degraded")

    doc = cluster.wait_phase("ready", 60)
    assert doc["placement"]["decode"] == ["n2", "n4"]
    ranks = {}
    for p in doc["processes"]:
        if p["node"] == "n4":
            cfg = get_json(f"http://{p['endpoint']}/debug/config")
            ranks[p["name"]] = int(cfg["dp_env"]["VLLM_DP_RANK"])
            assert p["endpoint"].startswith("127.0.0.4:")  # n4's own address
    assert sorted(ranks.values()) == lost_ranks == [2, 3]
    messages = [e["message"] for e in run(_events(cluster))]
    assert "n3 lost (lease expired)" in messages
    wait_proxy_routes(doc)  # the proxy follows etcd on its own watch
    answer = post_json(doc["proxy_url"] + "/v1/completions", {"model": "sim-model", "prompt": "again", "max_tokens": 2})
    assert answer["usage"]["completion_tokens"] == 2


def test_master_restart_restarts_engines_after_it_is_ready(cluster):
    if not HAVE_MASTER:
        if os.environ.get("CI"):
            pytest.fail("CI must have the real mooncake_master (pip mooncake-transfer-engine-non-cuda)")
        pytest.skip("mooncake_master not installed")
    doc = cluster.doc()
    master = next(p for p in doc["processes"] if p["role"] == "mooncake-master")
    engines = {(p["node"], p["name"]): p["pid"] for p in doc["processes"] if p["role"] in ("prefill", "decode")}
    proxy_pid = next(p["pid"] for p in doc["processes"] if p["role"] == "proxy")
    os.kill(master["pid"], signal.SIGKILL)

    def all_engines_new() -> bool:
        d = cluster.doc()
        now = {(p["node"], p["name"]): p for p in d["processes"] if p["role"] in ("prefill", "decode")}
        return d["phase"] == "ready" and all(now[k]["pid"] not in (None, pid) for k, pid in engines.items())

    wait_for(all_engines_new, 60, 0.1, what="engines restarted against the new master")
    doc = cluster.doc()
    new_master = next(p for p in doc["processes"] if p["role"] == "mooncake-master")
    assert new_master["pid"] != master["pid"] and new_master["restarts"] == master["restarts"] + 1
    assert next(p["pid"] for p in doc["processes"] if p["role"] == "proxy") == proxy_pid  # follows etcd
    messages = [e["message"] for e in run(_events(cluster))]
    restarted = [m for m in messages if m.startswith("mooncake master restarted")]
    assert len(restarted) == 1 and f"pid {master['pid']} -> {new_master['pid']}" in restarted[0]
    # the restarted engines registered with the new master from the same JSON
    wait_proxy_routes(doc)  # the proxy follows etcd on its own watch
    answer = post_json(doc["proxy_url"] + "/v1/completions", {"model": "sim-model", "prompt": "new master", "max_tokens": 2})
    assert answer["usage"]["completion_tokens"] == 2
    _assert_kv_handed_over(doc)


def test_stop_leaves_nothing_running(cluster):
    doc = cluster.doc()
    pids = [p["pid"] for p in doc["processes"] if p["pid"]]
    assert pids
    status, _ = cluster.request("POST", "/cluster/stop")
    assert status == 202
    cluster.wait_phase("stopped", 60)
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, what="every cluster process gone")
    agents = {a.proc.pid for a in cluster.agents.values() if a.proc and a.proc.poll() is None}
    leftovers = []
    for p in marked(cluster.marker):
        if p.pid not in agents:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftovers.append(p.cmdline())
    assert leftovers == []
    kill_marked(cluster.marker)


def test_wait_policy_holds_the_slot_until_the_node_returns(cluster):
    """After the stop above: the agents back (n3 too), a spec with `node_loss: wait`."""
    for name, agent in cluster.agents.items():
        if agent.proc is None or agent.proc.poll() is not None:
            cluster.restart(name)
    wait_for(lambda: len(cluster.doc()["members"]) == 4, 20, what="all four agents registered")
    spec = cluster_spec(cluster.cluster, cluster.etcd, decode_nodes=["n2", "n3"], ttl=TTL)
    status, body = cluster.submit(spec)
    assert status == 202
    doc = cluster.wait_phase("ready", 60)
    n3_ranks = sorted(p["dp_rank"] for p in doc["processes"] if p["node"] == "n3")
    agent = cluster.agents["n3"]
    kill_tree(agent.proc.pid)  # the node dies
    agent.proc.wait(5)
    doc = cluster.wait_phase("degraded", TTL + 10)
    assert {p["state"] for p in doc["processes"] if p["node"] == "n3"} == {"lost"}
    assert "decode.node_names: node n3 is not registered" in doc["missing"]
    assert doc["placement"]["decode"] == ["n2", "n3"]  # nobody took its slot
    assert not any(p["node"] == "n4" for p in doc["processes"])
    cluster.restart("n3")  # the node comes back: its agent starts what is still assigned to it
    doc = cluster.wait_phase("ready", 60)
    assert sorted(p["dp_rank"] for p in doc["processes"] if p["node"] == "n3") == n3_ranks
    status, _ = cluster.request("POST", "/cluster/stop")
    assert status == 202
    cluster.wait_phase("stopped", 60)
