"""The real Mooncake path: the planner's Mooncake JSON drives a real MooncakeDistributedStore.

One prefill and one decode sim engine run as processes with `--sim-kv-transfer mooncake`
and a real `mooncake_master` runs from the plan's own argv, once per `mooncake.metadata`
mode the planner offers: `p2p` (the default, no metadata server) and `master-http` (the
master's own). The control-plane etcd is in the spec but no engine is pointed at it. The
JSON files are the plan's `FileSpec`s, written as the agent writes them. A request through
the built-in proxy must move bytes prefill -> store -> decode, verified by sha256 on the
decode side.

Skipped when mooncake is not installed, except under CI (`CI` set), where that fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.planner import plan_cluster
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.host.files import atomic_write
from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree
from pdsupervisor.simengine.config import ConfigError, parse_args
from pdsupervisor.simengine.kvstore import KVError, MooncakeKV, kv_payload
from tests.cluster_helpers import sim_argv
from tests.conftest import wait_for
from tests.pdproc import Procs, http, metric, wait_up


def _mooncake_missing() -> str | None:
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return f"the mooncake package cannot be imported ({exc})"
    if shutil.which("mooncake_master") is None:
        return "mooncake_master is not on PATH"
    return None


def require_mooncake() -> None:
    missing = _mooncake_missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the real Mooncake path: {missing}")
    if missing:
        pytest.skip(missing)


# Caps on the JSON's sizes for this machine (the JSON keeps the spec's production defaults:
# a 50 GiB segment that the store would allocate at start-up).
CAPS = {"PDSIM_MOONCAKE_SEGMENT_CAP": "32MiB", "PDSIM_MOONCAKE_BUFFER_CAP": "16MiB", "PDSIM_KV_TIMEOUT": "1.5",
        # keep the transfer engine's advertised address on loopback (else: first active NIC)
        "MC_TCP_BIND_ADDRESS": "{node_ip}"}


def mooncake_plan(tmp: Path, etcd: str, metadata: str = "p2p"):
    spec = validate_spec({
        "cluster": "mc-kv",
        "model": "sim-model",
        "etcd": {"endpoints": [etcd]},
        "engine_env": CAPS,
        "mooncake": {
            # protocol stays `auto` (no RDMA device registered -> tcp), sizes stay the defaults
            "gc_args": [], "port": free_port(), "max_threads": 4, "metadata": metadata, "metadata_port": free_port(),
            "extra_args": ["-rpc_address", "{node_ip}", "-metrics_host", "{node_ip}",
                           "-metrics_port", str(free_port()), "-rpc_thread_num", "2"],
        },
        "prefill": {"node_names": ["n1"], "tp": 1, "slots": 1, "base_port": free_port(),
                    "argv": sim_argv("kv_producer", mooncake_kv=True)},
        "decode": {"node_names": ["n2"], "tp": 1, "slots": 1, "base_port": free_port(),
                   "argv": sim_argv("kv_consumer", mooncake_kv=True)},
        "proxy": {"kind": "builtin", "port": free_port()},
        "host_requirements": {"thp_mode": None},
    })
    nodes = {n: NodeFacts(name=n, ip="127.0.0.1", state_dir=str(tmp / n), python=sys.executable)
             for n in ("n1", "n2")}
    return plan_cluster(spec, nodes)


def start_spec(procs: Procs, p) -> subprocess.Popen[bytes]:  # p: ProcessSpec
    """Run a planned process as the agent's supervisor would: its files first, then its argv."""
    for f in p.files:
        atomic_write(f.path, f.content.encode(), f.mode)
    return procs.run(p.argv, p.env, name=f"{p.role}-{p.name}")


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module", params=["p2p", "master-http"])
def kv_cluster(request, etcd_server, tmp_path_factory):
    require_mooncake()
    tmp = tmp_path_factory.mktemp("mckv")
    plan = mooncake_plan(tmp, etcd_server.endpoint, request.param)
    procs = Procs(tmp)
    try:
        (master,) = [p for np_ in plan.nodes.values() for p in np_.processes if p.role == "mooncake-master"]
        m = start_spec(procs, master)
        wait_for(lambda: _tcp_open(master.host, master.port) or m.poll() is not None, 10, what="mooncake_master")
        assert m.poll() is None, procs.log(m)
        metadata_server = "P2PHANDSHAKE"
        if request.param == "master-http":  # the master binds its metadata server before its RPC port
            md_port = int(master.argv[master.argv.index("-http_metadata_server_port") + 1])
            assert _tcp_open(master.host, md_port), procs.log(m)
            metadata_server = f"http://{master.host}:{md_port}/metadata"
        engines = {p.role: p for _, p in plan.engines()}
        running = {role: start_spec(procs, p) for role, p in engines.items()}
        for role, p in engines.items():
            wait_up(p.endpoint, running[role], timeout=20, log=lambda role=role: procs.log(running[role]))
        proxy, _ = procs.proxy("--prefill", engines["prefill"].endpoint, "--decode", engines["decode"].endpoint)
        yield {"plan": plan, "proxy": proxy, "prefill": f"http://{engines['prefill'].endpoint}",
               "decode": f"http://{engines['decode'].endpoint}", "log": lambda role: procs.log(running[role]),
               "procs": running, "master": m, "metadata": request.param, "metadata_server": metadata_server}
    finally:
        procs.kill_all()


def test_plan_json_is_the_production_shape(kv_cluster):
    """The engines got the planner's JSON untouched; only the sim engine's caps shrink the sizes."""
    plan = kv_cluster["plan"]
    cfg = json.loads(Path(plan.nodes["n1"].mooncake_config_path).read_text())
    assert cfg["protocol"] == "tcp" and cfg["device_name"] == ""
    assert cfg["metadata_server"] == kv_cluster["metadata_server"]
    assert "etcd" not in json.dumps(cfg) and cfg["global_segment_size"] == 53687091200
    _, body = http("GET", kv_cluster["prefill"] + "/debug/kv")
    kv = json.loads(body)
    assert kv["ready"] and kv["config_path"] == plan.nodes["n1"].mooncake_config_path
    assert kv["setup_params"]["global_segment_size"] == 32 << 20
    assert kv["setup_params"]["master_server_address"] == plan.master_address
    assert kv["setup_params"]["metadata_server"] == cfg["metadata_server"]


def test_segments_are_found_through_the_planned_metadata(kv_cluster):
    """`master-http`: the prefill's segment descriptor is in the master's metadata server;
    `p2p`: the transfer engine runs its own handshake instead of any metadata server."""
    plan = kv_cluster["plan"]
    cfg = json.loads(Path(plan.nodes["n1"].mooncake_config_path).read_text())
    segment = json.loads(http("GET", kv_cluster["prefill"] + "/debug/kv")[1])["segment"]
    if kv_cluster["metadata"] == "master-http":
        status, body = http("GET", f"{cfg['metadata_server']}?key={quote(f'mooncake/ram/{segment}', safe='')}")
        assert status == 200 and json.loads(body), body
    else:
        assert "using P2P handshake" in kv_cluster["log"]("prefill")


def test_request_moves_verified_kv_bytes_through_mooncake(kv_cluster):
    pre, dec = kv_cluster["prefill"], kv_cluster["decode"]
    before = metric(dec, "vllm:sim_mooncake_kv_bytes_total")
    for body, path in (({"prompt": "hello mooncake " * 20, "max_tokens": 4}, "/v1/completions"),
                       ({"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 3, "stream": True},
                        "/v1/chat/completions")):
        status, out = http("POST", kv_cluster["proxy"] + path, body, timeout=20)
        assert status == 200, out[:500]
        put = json.loads(http("GET", pre + "/debug/kv")[1])["last_put"]
        got = json.loads(http("GET", dec + "/debug/kv")[1])["last_get"]
        assert got["key"] == put["key"] and got["sha256_ok"], (got, put)
        assert got["bytes_read"] == put["bytes"] and got["sha256"] == put["sha256"]
    assert put["bytes"] == 1 << 20  # the long chat prompt hit --sim-kv-max-bytes (default 1 MiB)
    put_total = metric(pre, "vllm:sim_mooncake_kv_put_bytes_total")
    assert metric(dec, "vllm:sim_mooncake_kv_bytes_total") - before == put_total > 0
    assert metric(dec, "vllm:sim_mooncake_kv_verified_total") >= 2
    assert metric(dec, "vllm:sim_kv_transfer_hits_total") >= 2
    assert metric(dec, "vllm:sim_mooncake_kv_failures_total") == 0


def _prefill_kv(pre: str, prompt: str) -> dict:
    """Prefill `prompt` on the producer; the kv_transfer_params it answers with."""
    status, out = http("POST", pre + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 200, out
    return json.loads(out)["kv_transfer_params"]


def test_bad_kv_is_an_error_not_a_fallback(kv_cluster):
    pre, dec = kv_cluster["prefill"], kv_cluster["decode"]
    prompt = "tamper " * 8
    kv = _prefill_kv(pre, prompt)
    failures = metric(dec, "vllm:sim_mooncake_kv_failures_total")
    for bad in ({**kv, "kv_sha256": "0" * 64}, {**kv, "mooncake_key": kv["mooncake_key"] + "-missing"}):
        status, out = http("POST", dec + "/v1/completions", {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": bad})
        assert status == 500, out
        err = json.loads(out)  # vLLM's ErrorResponse shape, as every sim engine error
        assert err["object"] == "error" and err["type"] == "InternalServerError" and err["code"] == 500
        assert "KV transfer failed" in err["message"]
        assert json.loads(http("GET", dec + "/debug/kv")[1])["last_get"]["sha256_ok"] is False
    assert metric(dec, "vllm:sim_mooncake_kv_failures_total") == failures + 2
    status, _ = http("POST", dec + "/v1/completions", {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv})
    assert status == 200  # the genuine params still read back fine


def test_unanswered_master_is_a_bounded_error(kv_cluster):
    """A frozen master makes the store wait ~30 s; the request fails after --sim-kv-timeout instead."""
    pre, dec = kv_cluster["prefill"], kv_cluster["decode"]
    prompt = "frozen " * 4
    kv = _prefill_kv(pre, prompt)
    master = kv_cluster["master"]
    os.kill(master.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, out = http("POST", dec + "/v1/completions", {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv})
        took = time.monotonic() - t0
    finally:
        os.kill(master.pid, signal.SIGCONT)
    assert status == 500 and b"timed out" in out, out
    assert 1.4 < took < 10  # the point: --sim-kv-timeout, not the store's ~30 s


def test_sigterm_exits_cleanly(kv_cluster):
    """A stopped engine exits at once and cleanly, leaving its segment to the master's TTL."""
    proc = kv_cluster["procs"]["decode"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, kv_cluster["log"]("decode")


def test_stop_with_master_and_etcd_gone_is_bounded(kv_cluster, etcd_server):
    """With the master and etcd gone, a stop still takes no Mooncake call: prompt and clean.
    (The engines never use this etcd any more; pausing it still shows nothing waits on it.)"""
    kill_tree(kv_cluster["master"].pid)
    etcd_server.pause()
    try:
        proc = kv_cluster["procs"]["prefill"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, kv_cluster["log"]("prefill")
        assert time.monotonic() - t0 < 10, kv_cluster["log"]("prefill")  # not the store's ~30 s
    finally:
        etcd_server.resume()


# ---- no library needed ----------------------------------------------------------------


def _cfg(tmp_path: Path, mc: dict, *extra: str):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(mc))
    return parse_args(["--sim-kv-transfer", "mooncake", *extra], env={"MOONCAKE_CONFIG_PATH": str(path)})


MC = {"local_hostname": "10.0.0.1", "metadata_server": "P2PHANDSHAKE", "protocol": "tcp", "device_name": "",
      "master_server_address": "10.0.0.9:50001", "global_segment_size": 53687091200, "local_buffer_size": 10737418240}


def test_caps_and_size_checks(tmp_path):
    kv = MooncakeKV(_cfg(tmp_path, MC, "--sim-mooncake-segment-cap", "64MiB", "--sim-mooncake-buffer-cap", "8m"))
    args = kv.setup_args()
    assert args["global_segment_size"] == 64 << 20 and args["local_buffer_size"] == 8 << 20
    assert args["master_server_address"] == "10.0.0.9:50001" and args["protocol"] == "tcp"
    with pytest.raises(KVError, match="minimum"):
        MooncakeKV(_cfg(tmp_path, MC, "--sim-mooncake-segment-cap", "1MiB")).setup_args()
    with pytest.raises(KVError, match="local_buffer_size"):
        MooncakeKV(_cfg(tmp_path, MC, "--sim-mooncake-buffer-cap", "512k")).setup_args()
    with pytest.raises(KVError, match="master_server_address"):
        MooncakeKV(_cfg(tmp_path, {k: v for k, v in MC.items() if k != "master_server_address"})).setup_args()
    with pytest.raises(ConfigError, match="MOONCAKE_CONFIG_PATH"):
        parse_args(["--sim-kv-transfer", "mooncake"], env={})
    with pytest.raises(ConfigError):
        parse_args(["--sim-kv-transfer", "nixl"], env={})
    assert parse_args([], env={}).kv_transfer == "none"
    assert kv_payload("a", 100) == kv_payload("a", 100) != kv_payload("b", 100)
