"""Prefix-aware prefill routing: `--policy prefix` against `load` and `round-robin`.

For each policy, fresh simulated engines (so every policy starts with cold prefix caches):
`--prefill` engines that pay `--ttft-per-token` per prompt token their prefix cache does not
hold (`--cache-blocks` blocks of 16 tokens each, in `--max-batch` slots) and `--decode` engines
with no delays, behind `python -m pdsupervisor.proxy --policy P`. The workload is chat:
`--prompts` system prompts of `--prompt-words` words (the sim's tokens), each request one of
them (uniformly at random; `--hot F`: the first one for a share F of the requests) plus a user
turn of 20-60 random words, streamed, `--requests` of them from `--concurrency` clients, the
same seeded sequence for every policy.

Printed per policy: prefill tokens computed (the prefill engines'
`vllm:sim_prefill_computed_tokens_total`, summed), cache hit rate (`vllm:prefix_cache_hits_total` /
`vllm:prefix_cache_queries_total`), TTFT p50 / p99 (from sending the request to the first byte
of content: the first SSE event with a non-empty delta), p99 of the requests after the first
`--warmup` sent (every cache starts cold), requests per prefill engine, and for
`prefix` how the proxy routed (`pdproxy_prefix_routed_total`). Everything on 127.0.0.1; every
process started is killed at the end.

    python bench/prefix_bench.py                      # each engine caches ~2/3 of the system prompts
    python bench/prefix_bench.py --cache-blocks 4096  # the sim's default: each caches all of them
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _localbench import machine
from proxy_bench import Procs, wait_http

from pdsupervisor.local.ports import free_port

POLICIES = ("load", "round-robin", "prefix")


@dataclass
class Outcome:
    policy: str
    computed: float = 0.0
    queries: float = 0.0
    hits: float = 0.0
    ttft: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)  # TTFT of the requests after the warm-up ones
    errors: int = 0
    wall_s: float = 0.0
    per_prefill: list[int] = field(default_factory=list)
    routed: dict[str, int] = field(default_factory=dict)

    def pct(self, q: float, warm: bool = False) -> float:
        xs = sorted(self.warm if warm else self.ttft)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else 0.0


def workload(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    """The requests' messages: a system prompt of `prompt_words` words, then a short user turn."""
    rng = random.Random(args.seed)
    vocab = [f"w{i}" for i in range(5000)]
    systems = [" ".join(rng.choices(vocab, k=args.prompt_words)) for _ in range(args.prompts)]
    return [[{"role": "system", "content": systems[0] if rng.random() < args.hot else rng.choice(systems)},
             {"role": "user", "content": " ".join(rng.choices(vocab, k=rng.randint(20, 60)))}]
            for _ in range(args.requests)]


def scrape(base: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Each named metric's samples from a Prometheus endpoint: {name: {labels: value}}."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in out:
            labels, _, value = rest.rpartition("} ")
            out[name][labels] = float(value)
    return out


async def drive(url: str, requests: list[list[dict[str, str]]], concurrency: int, warmup: int, out: Outcome) -> None:
    import aiohttp

    queue = list(reversed(list(enumerate(requests))))

    async def one(session: aiohttp.ClientSession, n: int, messages: list[dict[str, str]]) -> None:
        body = {"model": "sim-model", "messages": messages, "max_tokens": 8, "stream": True}
        t0 = time.perf_counter()
        first: float | None = None
        async with session.post(url, json=body) as r:
            async for line in r.content:
                if first is None and line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter() - t0
            if r.status != 200 or first is None:
                out.errors += 1
            else:
                out.ttft.append(first)
                if n >= warmup:
                    out.warm.append(first)

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            await one(session, *queue.pop())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        out.wall_s = time.perf_counter() - t0


def run_policy(policy: str, args: argparse.Namespace, requests: list[list[dict[str, str]]], procs: Procs) -> Outcome:
    py = sys.executable
    engine = [py, "-m", "pdsupervisor.simengine", "--model", "sim-model", "--host", "127.0.0.1"]
    prefill_args = ["--sim-ttft-per-token", str(args.ttft_per_token), "--sim-max-batch", str(args.max_batch),
                    "--sim-prefix-cache-blocks", str(args.cache_blocks),
                    "--kv-transfer-config", json.dumps({"kv_role": "kv_producer"})]
    decode_args = ["--sim-max-batch", "100000", "--kv-transfer-config", json.dumps({"kv_role": "kv_consumer"})]
    started = []
    endpoints: dict[str, list[str]] = {"prefill": [], "decode": []}
    for role, n, extra in (("prefill", args.prefill, prefill_args), ("decode", args.decode, decode_args)):
        for i in range(n):
            port = free_port()
            started.append(procs.start(f"{policy}-{role}{i}", [*engine, "--port", str(port), *extra]))
            endpoints[role].append(f"127.0.0.1:{port}")
    port = free_port()
    started.append(procs.start(f"{policy}-proxy", [
        py, "-m", "pdsupervisor.proxy", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
        "--prefill", *endpoints["prefill"], "--decode", *endpoints["decode"], "--log-level", "WARNING"]))
    base = f"http://127.0.0.1:{port}"
    try:
        for ep in [*endpoints["prefill"], *endpoints["decode"]]:
            if not wait_http(f"http://{ep}/health"):
                sys.exit(f"engine {ep} did not start; logs in {procs.logdir}")
        if not wait_http(base + "/health"):
            sys.exit(f"the proxy did not start; log in {procs.logdir}")
        out = Outcome(policy)
        asyncio.run(drive(base + "/v1/chat/completions", requests, args.concurrency, args.warmup, out))
        names = ("vllm:sim_prefill_computed_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:request_success_total")
        for ep in endpoints["prefill"]:
            m = scrape(f"http://{ep}", names)
            out.computed += sum(m[names[0]].values())
            out.queries += sum(m[names[1]].values())
            out.hits += sum(m[names[2]].values())
            out.per_prefill.append(int(sum(m[names[3]].values())))
        routed = scrape(base, ("pdproxy_prefix_routed_total",))["pdproxy_prefix_routed_total"]
        out.routed = {k.split('"')[1]: int(v) for k, v in routed.items()}
        return out
    finally:
        for p in started:
            procs.stop(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--prefill", type=int, default=2, help="prefill engines")
    ap.add_argument("--decode", type=int, default=1, help="decode engines")
    ap.add_argument("--prompts", type=int, default=16, help="distinct system prompts")
    ap.add_argument("--prompt-words", type=int, default=1000, help="a system prompt's length, in the sim's tokens")
    ap.add_argument("--requests", type=int, default=480)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--ttft-per-token", type=float, default=0.0005, help="prefill seconds per uncached token")
    ap.add_argument("--max-batch", type=int, default=4, help="a prefill engine's slots")
    ap.add_argument("--cache-blocks", type=int, default=704,
                    help="a prefill engine's prefix cache, in blocks of 16 tokens (704: 11 of the 16 system prompts)")
    ap.add_argument("--hot", type=float, default=0.0,
                    help="share of the requests that get the first system prompt (the others: any, uniformly)")
    ap.add_argument("--warmup", type=int, default=48, help="requests left out of the warm TTFT p99 (the first ones sent)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    requests = workload(args)
    procs = Procs(Path(tempfile.mkdtemp(prefix="prefix-bench-")))
    results = []
    try:
        for policy in args.policies:
            r = run_policy(policy, args, requests, procs)
            results.append(r)
            print(f"{policy:11s} computed {r.computed:9.0f}  hit rate {r.hits / max(r.queries, 1):6.1%}  "
                  f"TTFT p50 {r.pct(0.5):7.1f} ms  p99 {r.pct(0.99):7.1f} ms  warm p99 {r.pct(0.99, True):7.1f} ms  "
                  f"{r.wall_s:5.1f} s  "
                  f"errors {r.errors}", flush=True)
    finally:
        procs.stop_all()
    print(f"\n## {args.prefill} prefill + {args.decode} decode, {args.prompts} system prompts x {args.prompt_words} "
          f"tokens, {args.requests} requests at concurrency {args.concurrency}, {args.ttft_per_token * 1e3:g} ms/token, "
          f"{args.max_batch} slots, cache {args.cache_blocks} blocks; {machine()}\n")
    print("| policy | prefill tokens computed | vs load | cache hit rate | TTFT p50 ms | TTFT p99 ms | p99 after warm-up ms "
          "| wall s | requests per prefill | routed (hit/busy/miss) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    load = next((r.computed for r in results if r.policy == "load"), None)
    for r in results:
        vs = f"{r.computed / load - 1:+.0%}" if load else "-"
        routed = "/".join(str(r.routed.get(k, 0)) for k in ("hit", "busy", "miss")) if r.routed else "-"
        print(f"| {r.policy} | {r.computed:.0f} | {vs} | {r.hits / max(r.queries, 1):.1%} | {r.pct(0.5):.1f} | "
              f"{r.pct(0.99):.1f} | {r.pct(0.99, True):.1f} | {r.wall_s:.1f} | {' / '.join(map(str, r.per_prefill))} | "
              f"{routed} | {r.errors} |")


if __name__ == "__main__":
    main()
