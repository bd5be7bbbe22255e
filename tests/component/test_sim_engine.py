"""The simulated engine as a real process: flags, env, roles, timing, streaming, metrics."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

from tests.pdproc import http, metric, wait_for, wait_up


def test_debug_config_shows_flags_env_and_mooncake_json(procs, tmp_path):
    mc = {"local_hostname": "10.0.0.7", "metadata_server": "etcd://10.0.0.1:2379", "protocol": "tcp",
          "device_name": "", "master_server_address": "10.0.0.1:50001"}
    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps(mc))
    env = {"VLLM_DP_SIZE": "4", "VLLM_DP_RANK": "3", "VLLM_DP_RANK_LOCAL": "1", "VLLM_DP_MASTER_IP": "10.0.0.2",
           "VLLM_DP_MASTER_PORT": "25940", "VLLM_EP_SIZE": "8", "MOONCAKE_CONFIG_PATH": str(path)}
    ep, p = procs.engine(
        "decode", "--max-model-len", "8192", "--gpu-memory-utilization", "0.9", "-tp", "2", "--max-num-seqs", "32",
        "--trust-remote-code", "--max-num-batched-tokens", "8192", "--distributed_executor_backend", "mp", env=env,
        wait=False,
    )
    # DP rank 3 of 4 whose master (10.0.0.2) never answers: it listens, but is never ready
    wait_for(lambda: http("GET", f"http://{ep}/debug/config")[0] == 200 or p.poll() is not None, timeout=15,
             what="engine to listen")
    assert p.poll() is None, procs.log(p)
    assert http("GET", f"http://{ep}/health") == (503, b"DP rank 3/4: waiting for the group at 10.0.0.2:25940")
    status, body = http("GET", f"http://{ep}/debug/config")
    assert status == 200
    cfg = json.loads(body)
    assert cfg["model"] == "sim-model" and cfg["tp"] == 2 and cfg["port"] == int(ep.split(":")[1])
    assert cfg["kv_role"] == "kv_consumer"
    assert cfg["dp_env"] == {k: v for k, v in env.items() if k.startswith("VLLM_")}
    assert cfg["dp"] == {"size": 4, "rank": 3, "master": "10.0.0.2:25940", "source": "env"}
    assert cfg["mooncake_config"] == mc and cfg["mooncake_config_path"] == str(path)
    assert "--trust-remote-code" in cfg["ignored_flags"] and "--distributed_executor_backend" in cfg["ignored_flags"]
    assert "-tp" in cfg["argv"]


def test_bad_mooncake_path_fails_to_start(procs, tmp_path):
    p = procs.start("pdsupervisor.simengine", ["--port", "1"], env={"MOONCAKE_CONFIG_PATH": str(tmp_path / "nope.json")})
    assert p.wait(timeout=15) != 0


def test_completions_chat_stream_usage_and_eos(procs):
    ep, _ = procs.engine(None, "--sim-natural-len", "4")
    base = f"http://{ep}"
    status, body = http("GET", base + "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "sim-model"
    status, body = http("POST", base + "/v1/completions", {"prompt": "one two three", "max_tokens": 7, "ignore_eos": True})
    out = json.loads(body)
    assert status == 200 and out["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert out["choices"][0]["finish_reason"] == "length" and out["choices"][0]["text"].split() == [f"t{i}" for i in range(7)]
    # without ignore_eos the "model" stops by itself after natural_len tokens
    out = json.loads(http("POST", base + "/v1/completions", {"prompt": "x", "max_tokens": 7})[1])
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "stop"
    chat = {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
    out = json.loads(http("POST", base + "/v1/chat/completions", chat)[1])
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == " t0 t1"
    status, body = http("POST", base + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "a b"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    events = [e for e in body.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == " t0 t1 t2"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert http("POST", base + "/v1/completions", b"{not json")[0] == 400


def test_load_time_is_respected(procs):
    port_args = ("--sim-load-time", "3")
    t0 = time.monotonic()
    ep, p = procs.engine(None, *port_args, wait=False)
    host, port = ep.split(":")
    # not listening while "loading": once the engine says it is loading, 3 s remain before it listens
    wait_for(lambda: "simulating model load" in procs.log(p) or p.poll() is not None, timeout=15,
             what="engine to start loading")
    assert "simulating model load" in procs.log(p), procs.log(p)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=0.2).close()
    wait_up(ep, p)
    assert time.monotonic() - t0 >= 3


def test_sigterm_stops_the_engine_loading_or_serving(procs):
    """SIGTERM ends the engine at once, exit status 0, whether it is still "loading" or listening."""
    _, loading = procs.engine(None, "--sim-load-time", "60", wait=False)
    wait_for(lambda: "simulating model load" in procs.log(loading) or loading.poll() is not None, timeout=15,
             what="engine to start loading")
    _, serving = procs.engine(None)
    for p in (loading, serving):
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=5) == 0, procs.log(p)
        assert "Traceback" not in procs.log(p), procs.log(p)


def test_prefill_and_decode_roles(procs):
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode", "--sim-ttft-per-token", "0.2")
    prompt = " ".join(["w"] * 10)
    out = json.loads(http("POST", f"http://{pre}/v1/completions", {"prompt": prompt, "max_tokens": 1})[1])
    kv = out["kv_transfer_params"]
    assert kv["remote_engine"] == pre and kv["num_prompt_tokens"] == 10
    t0 = time.monotonic()
    http("POST", f"http://{dec}/v1/completions", {"prompt": prompt, "max_tokens": 2, "kv_transfer_params": kv})
    fast = time.monotonic() - t0
    t0 = time.monotonic()
    http("POST", f"http://{dec}/v1/completions", {"prompt": prompt, "max_tokens": 2})
    slow = time.monotonic() - t0
    assert slow >= 2.0 > fast  # 10 prompt tokens prefilled locally at 0.2 s each, or none
    assert metric(f"http://{dec}", "vllm:sim_decode_local_prefills_total") == 1
    assert metric(f"http://{dec}", "vllm:sim_kv_transfer_hits_total") == 1
    assert metric(f"http://{dec}", "vllm:prompt_tokens_total") == 20


def test_the_prefix_cache_prefills_only_what_it_does_not_hold(procs):
    ep, _ = procs.engine("prefill", "--sim-ttft-per-token", "0.01")
    base = f"http://{ep}"
    prompt = " ".join(f"w{i}" for i in range(100))  # 6 full blocks of 16 tokens, and 4 more

    def timed(body: dict) -> float:
        t0 = time.monotonic()
        assert http("POST", base + "/v1/completions", {**body, "max_tokens": 1})[0] == 200
        return time.monotonic() - t0

    first, again = timed({"prompt": prompt}), timed({"prompt": prompt})
    assert first >= 1.0 > 0.5 > again  # 100 tokens prefilled at 10 ms each, then only the last 4
    assert metric(base, "vllm:prefix_cache_queries_total") == 200
    assert metric(base, "vllm:prefix_cache_hits_total") == 96
    assert metric(base, "vllm:sim_prefill_computed_tokens_total") == 104
    assert metric(base, "vllm:prompt_tokens_total") == 200  # every prompt token, cached or not
    # another ending after the same 40 words: the 2 full blocks they fill are cached
    timed({"prompt": " ".join(prompt.split()[:40] + ["x"] * 10)})
    assert metric(base, "vllm:prefix_cache_hits_total") == 96 + 32
    assert metric(base, "vllm:sim_prefill_computed_tokens_total") == 104 + 18

    off, _ = procs.engine("prefill", "--sim-prefix-cache-blocks", "0")
    for _ in range(2):
        http("POST", f"http://{off}/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert metric(f"http://{off}", "vllm:sim_prefill_computed_tokens_total") == 200
    assert metric(f"http://{off}", "vllm:prefix_cache_queries_total") == 0


def test_batch_slots_make_requests_wait(procs):
    ep, _ = procs.engine(None, "--sim-max-batch", "1", "--sim-tpot", "0.2")
    base = f"http://{ep}"
    request = ("POST", base + "/v1/completions", {"prompt": "x", "max_tokens": 8, "ignore_eos": True})
    threads = [threading.Thread(target=http, args=request) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(base, "vllm:num_requests_running") == 1 and metric(base, "vllm:num_requests_waiting") == 1,
             timeout=5, what="one running, one waiting")
    for t in threads:
        t.join()
    assert metric(base, "vllm:num_requests_waiting") == 0 and metric(base, "vllm:generation_tokens_total") == 16


def test_every_sim_flag_reads_its_env_var_and_a_flag_wins():
    from pdsupervisor.simengine.config import _SIM_ENV, _VALUE_FLAGS, parse_args

    assert set(_SIM_ENV.values()) == {f for f in _VALUE_FLAGS if f.startswith("--sim-")}
    # the names the README, the tests' cluster env and deployments use: renaming one breaks them
    documented = {"PDSIM_KV_BYTES_PER_TOKEN", "PDSIM_KV_MAX_BYTES", "PDSIM_KV_TIMEOUT", "PDSIM_KV_TRANSFER",
                  "PDSIM_LOAD_TIME", "PDSIM_MAX_BATCH", "PDSIM_MOONCAKE_BUFFER_CAP", "PDSIM_MOONCAKE_SEGMENT_CAP",
                  "PDSIM_NATURAL_LEN", "PDSIM_PREFIX_CACHE_BLOCKS", "PDSIM_TPOT", "PDSIM_TTFT_PER_TOKEN"}
    assert set(_SIM_ENV) == documented
    cfg = parse_args([], env={"PDSIM_NATURAL_LEN": "5", "PDSIM_MAX_BATCH": "3", "PDSIM_KV_MAX_BYTES": "64k"})
    assert (cfg.natural_len, cfg.max_batch, cfg.kv_max_bytes) == (5, 3, 64 << 10)
    assert parse_args(["--sim-natural-len", "7"], env={"PDSIM_NATURAL_LEN": "5"}).natural_len == 7


def test_a_wildcard_bind_is_reached_through_loopback():
    from pdsupervisor.simengine.config import SimConfig
    from pdsupervisor.simengine.server import SimEngine

    for host in ("0.0.0.0", "::", "[::]", ""):
        assert SimEngine(SimConfig(argv=[], host=host, port=8123)).endpoint == "127.0.0.1:8123"
    assert SimEngine(SimConfig(argv=[], host="10.0.0.7", port=8123)).endpoint == "10.0.0.7:8123"
