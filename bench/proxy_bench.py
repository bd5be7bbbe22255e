"""Proxy benchmark: direct to a simulated engine vs. proxies in front of a prefill + decode pair.

Contenders (each skipped, with a note, when not installed; this script installs nothing):
  direct   : the decode engine itself (the baseline)
  ours     : `python -m pdsupervisor.proxy`
  toy      : vLLM's toy proxy shipped in `mooncake-transfer-engine-non-cuda` (FastAPI + httpx)
  router   : `vllm-router --vllm-pd-disaggregation` (Rust)

Engines are `pdsupervisor.simengine` with zero delays. Load is `POST /v1/completions` in each
mode: `plain` (non-streamed, max_tokens 16), `stream64` and `stream512` (`stream: true`,
`ignore_eos`, 64 or 512 tokens as server-sent events), at each concurrency for a fixed duration,
from `wrk` (C, one thread) when installed, else from an in-process aiohttp client. All on
127.0.0.1. "CPU us/req" is the contender's process tree's CPU time (user + system, its worker
processes included; the decode engine's for `direct`) over the requests answered: steadier than
req/s on a shared machine.

    python bench/proxy_bench.py --concurrency 1 16 64 256 --duration 5 --modes plain stream64 stream512
    python bench/proxy_bench.py --contenders ours --workers 1 2   # ours with 1, then 2 worker processes
    git archive main | tar -x -C /tmp/main && \
    python bench/proxy_bench.py --contenders ours router --before /tmp/main --rounds 3   # main vs this tree
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _localbench import machine

from pdsupervisor.local.ports import free_port

BODY = {"model": "sim-model", "prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 16}
# The request body of each mode.
MODES: dict[str, dict[str, object]] = {
    "plain": BODY,
    "stream64": {**BODY, "max_tokens": 64, "ignore_eos": True, "stream": True},
    "stream512": {**BODY, "max_tokens": 512, "ignore_eos": True, "stream": True},
}


def wait_http(url: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = json.dumps(BODY).encode() if url.endswith("completions") else None
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """`cwd`: where `python -m` finds the package first (the `before` tree)."""
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            self.stop(p)


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_us: float | None = None  # the contender's CPU time per request answered
    note: str = ""


def run_wrk(url: str, body: dict[str, object], conc: int, duration: float, tmp: Path) -> Result:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{json.dumps(body)}]]\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{max(1, int(duration))}s", "--latency", "--timeout", "30s", "-s", str(script), url],
        capture_output=True, text=True, check=False,
    ).stdout
    rps = p50 = p99 = 0.0
    errors = requests = 0
    for line in out.splitlines():
        parts = line.split()
        if " requests in " in line:
            requests = int(parts[0])
        elif line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            p50 = _ms(parts[1])
        elif parts[:1] == ["99%"]:
            p99 = _ms(parts[1])
        elif "Non-2xx" in line or "Socket errors" in line:
            errors += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    return Result(rps, p50, p99, errors, requests)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of the process and its live descendants (the proxy's workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _ms(s: str) -> float:
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 6e4)):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * f
    return float(s)


def run_aiohttp(url: str, body: dict[str, object], conc: int, duration: float) -> Result:
    import aiohttp

    async def go() -> Result:
        lat: list[float] = []
        errors = 0
        payload = json.dumps(body).encode()
        end = time.perf_counter() + duration
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    async with s.post(url, data=payload, headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                    lat.append(time.perf_counter() - t0)

            t_start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)), return_exceptions=True)
            elapsed = time.perf_counter() - t_start
        lat.sort()
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0.0] * 99
        return Result(len(lat) / elapsed, q[49] * 1e3, q[98] * 1e3, errors, len(lat))

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per (contender, mode, concurrency, round)")
    ap.add_argument("--contenders", nargs="+", default=["direct", "ours", "toy", "router"])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--workers", type=int, nargs="+", default=[1],
                    help="ours is run once per count given (--workers N); other contenders once")
    ap.add_argument("--before", type=Path, default=None,
                    help="also run ours from this source tree (e.g. a `git archive` of main), as contender `before`")
    ap.add_argument("--rounds", type=int, default=1,
                    help="cells per (contender, mode, concurrency), the contenders taking turns; the median is reported")
    ap.add_argument("--loadgen", choices=["auto", "wrk", "aiohttp"], default="auto")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # SIGTERM too stops what it started
    loadgen = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    procs = Procs(tmp)
    py = sys.executable
    try:
        pre_port, dec_port = free_port(), free_port()
        engines = {}
        for name, port, role in (("prefill", pre_port, "kv_producer"), ("decode", dec_port, "kv_consumer")):
            engines[name] = procs.start(name, [py, "-m", "pdsupervisor.simengine", "--model", "sim-model", "--host", "127.0.0.1",
                               "--port", str(port), "--sim-max-batch", "100000",
                               "--kv-transfer-config", json.dumps({"kv_role": role})])
        for port in (pre_port, dec_port):
            if not wait_http(f"http://127.0.0.1:{port}/health"):
                sys.exit(f"engine on {port} did not start; logs in {tmp}")
        notes: dict[str, str] = {}
        runs = [(f"ours x{w}" if w > 1 else name, name, w) if name == "ours" else (name, name, 1)
                for name in args.contenders for w in (args.workers if name == "ours" else [1])]
        if args.before is not None:
            runs.insert(0, ("before", "ours", 1))
        # All contenders run at once (on the same engines) and take turns at each cell: on a shared
        # machine, load that comes and goes then falls on all of them alike.
        live: dict[str, tuple[str, int]] = {}  # label -> (url, pid measured)
        for label, name, workers in runs:
            port = free_port()
            argv = contender_argv(name, port, pre_port, dec_port, workers)
            if isinstance(argv, str):
                notes[label] = argv
                print(f"# skipping {label}: {argv}", flush=True)
                continue
            cwd = args.before.resolve() if label == "before" and args.before else None
            proc = procs.start(label.replace(" ", ""), argv, cwd) if argv else None
            url = f"http://127.0.0.1:{port if argv else dec_port}/v1/completions"
            if not wait_http(url, timeout=60):
                notes[label] = "did not answer"
                print(f"# skipping {label}: did not answer (log in {tmp})", flush=True)
                if proc:
                    procs.stop(proc)
                continue
            live[label] = (url, (proc or engines["decode"]).pid)
        cells: dict[str, dict[tuple[str, int], list[Result]]] = {label: {} for label in live}
        for mode in args.modes:
            for conc in args.concurrency:
                for _ in range(args.rounds):
                    for label, (url, measured) in live.items():
                        cpu0 = cpu_seconds(measured)
                        body = MODES[mode]
                        r = (run_wrk(url, body, conc, args.duration, tmp) if loadgen == "wrk"
                             else run_aiohttp(url, body, conc, args.duration))
                        if r.requests:
                            r.cpu_us = (cpu_seconds(measured) - cpu0) / r.requests * 1e6
                        cells[label].setdefault((mode, conc), []).append(r)
                        print(f"{label:8s} {mode:9s} c={conc:<4d} {r.rps:9.0f} req/s  p50 {r.p50_ms:8.2f} ms  "
                              f"p99 {r.p99_ms:8.2f} ms  CPU {_us(r.cpu_us)} us/req  errors {r.errors}", flush=True)
        results = {label: {cell: _median(rs) for cell, rs in by_cell.items()} for label, by_cell in cells.items()}
        print_table(results, notes, args.modes, args.concurrency, loadgen, args.rounds)
    finally:
        procs.stop_all()


def _median(rs: list[Result]) -> Result:
    """Each figure's median over the rounds (errors: their sum)."""
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0
    cpu = [r.cpu_us for r in rs if r.cpu_us is not None]
    return Result(med([r.rps for r in rs]), med([r.p50_ms for r in rs]), med([r.p99_ms for r in rs]),
                  sum(r.errors for r in rs), sum(r.requests for r in rs), med(cpu) if cpu else None)


def contender_argv(name: str, port: int, pre: int, dec: int, workers: int = 1) -> list[str] | str:
    py = sys.executable
    if name == "direct":
        return []
    if name == "ours":
        return [py, "-m", "pdsupervisor.proxy", "--host", "127.0.0.1", "--port", str(port),
                "--prefill", f"127.0.0.1:{pre}", "--decode", f"127.0.0.1:{dec}", "--log-level", "WARNING",
                # the simulated engine, one Python process writing 64 streams of 512 tokens on a shared
                # core, can leave /health unanswered for over a second: not a dead engine to eject
                "--probe-timeout", "5",
                *(["--workers", str(workers)] if workers > 1 else [])]
    if name == "toy":
        spec = importlib.util.find_spec("mooncake")
        missing = [m for m in ("fastapi", "httpx", "uvicorn") if importlib.util.find_spec(m) is None]
        if spec is None or not spec.submodule_search_locations or missing:
            return "not installed (pip install mooncake-transfer-engine-non-cuda fastapi httpx uvicorn)"
        path = Path(list(spec.submodule_search_locations)[0]) / "vllm_v1_proxy_server.py"
        if not path.exists():
            return f"{path} not found"
        return [py, str(path), "--host", "127.0.0.1", "--port", str(port), "--prefiller-hosts", "127.0.0.1",
                "--prefiller-ports", str(pre), "--decoder-hosts", "127.0.0.1", "--decoder-ports", str(dec)]
    if name == "router":
        exe = shutil.which("vllm-router")
        if exe is None:
            return "not installed (pip install vllm-router)"
        return [exe, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
                "--prefill", f"http://127.0.0.1:{pre}", "--decode", f"http://127.0.0.1:{dec}", "--log-level", "warning",
                "--prometheus-port", str(free_port())]  # its default, 29000, clashes with any other router
    return f"unknown contender {name}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(results: dict[str, dict[tuple[str, int], Result]], notes: dict[str, str], modes: list[str],
                concs: list[int], loadgen: str, rounds: int) -> None:
    print(f"\n## load generator: {loadgen}; {machine()}; median of {rounds} round(s), contenders taking turns\n")
    print("| contender | mode | concurrency | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU us/req | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results.get("direct", {})
    for name, cells in results.items():
        for mode in modes:
            for c in concs:
                r = cells.get((mode, c))
                if r is None:
                    continue
                b = base.get((mode, c))
                add50 = f"{r.p50_ms - b.p50_ms:.2f}" if b and name != "direct" else "-"
                add99 = f"{r.p99_ms - b.p99_ms:.2f}" if b and name != "direct" else "-"
                print(f"| {name} | {mode} | {c} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {add50} | {add99} | "
                      f"{_us(r.cpu_us)} | {r.errors} |")
    for name, note in notes.items():
        print(f"\n{name}: skipped: {note}")


if __name__ == "__main__":
    main()
