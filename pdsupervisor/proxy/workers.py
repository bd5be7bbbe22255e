"""`--workers N`: N proxy processes serving one port, for more than one core.

The process started (the parent) serves nothing: it starts N workers, each `python -m
pdsupervisor.proxy` with the same arguments plus `--worker-index I`, each binding the port with
SO_REUSEPORT (the kernel spreads new connections over them), and supervises them:

- **Stop**: SIGTERM or SIGINT to the parent is passed to every worker (the agent signals the
  whole tree anyway); each stops as a single proxy does (the port closes, in-flight requests
  finish), and the parent exits 0 once all have, SIGKILLing any left after `STOP_GRACE_S`.
- **A worker that dies** is started again after `RESTART_DELAY_S`: the others serve meanwhile
  (only listening sockets get new connections). `CRASH_LIMIT` deaths within `CRASH_WINDOW_S`
  (a worker that cannot start, say the port is taken) bring the parent down, exit 1, for the
  agent to see and restart as it does any failing proxy.
- **The parent dying** (even by SIGKILL) stops the workers: each checks every
  `PARENT_CHECK_S` that its parent is still the one that started it.

Each worker runs everything a single proxy does: its own membership (with `--cluster`, its own
etcd watch), its own probes, in-flight counts and ejections. That is enough for balancing: the
kernel gives each worker an even share of connections, each spreads its share by its own counts,
so the sums stay even (a worker does not see the others' in-flight requests: two may pick the
same idle instance at once, an imbalance of at most N-1 requests, nothing next to an engine's
batch). A dead engine is ejected by each worker on its own, at its first failed exchange (retried
elsewhere: no client sees it) or probe, so within one probe interval; one probing for all would
save only those few retries, and sharing ejections would couple the workers' failures.

Metrics: each worker writes its snapshot (`ProxyMetrics.snapshot`) to `worker-I.json` in a
directory of the parent's every `SNAPSHOT_S` (removed when the parent stops; one left by a
parent that was killed, by the next parent to start), and answers `/metrics` with its own live
figures merged with the others' latest, so a scrape gives the whole proxy's whichever worker
answers; a restarted worker goes on from its predecessor's counts (the last second's may be
lost).
`/status` and `/health` are the answering worker's view.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType

from aiohttp import web

from pdsupervisor.aio.serve import SHUTDOWN_TIMEOUT_S, stop_tasks
from pdsupervisor.proxy.metrics import ProxyMetrics, Snapshot

log = logging.getLogger("pdsupervisor.proxy.workers")

RESTART_DELAY_S = 1.0
CRASH_LIMIT = 5  # worker deaths within CRASH_WINDOW_S that end the parent
CRASH_WINDOW_S = 60.0
STOP_GRACE_S = SHUTDOWN_TIMEOUT_S + 5.0  # workers finish their in-flight requests first (as the planner's stop timeout)
PARENT_CHECK_S = 1.0
SNAPSHOT_S = 1.0
POLL_S = 0.2
SHARED_PREFIX = "pdproxy-workers-"  # + the parent's pid: its workers' snapshots, in the temp directory


def supervise(args: list[str], workers: int) -> int:
    """Run `workers` workers of `python -m pdsupervisor.proxy ARGS` until a signal; the exit code."""
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _sweep_stale(Path(tempfile.gettempdir()))
    shared = tempfile.mkdtemp(prefix=f"{SHARED_PREFIX}{os.getpid()}-")

    def start(index: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "pdsupervisor.proxy", *args, "--worker-index", str(index), "--worker-dir", shared,
                "--worker-parent", str(os.getpid())]
        return subprocess.Popen(argv)

    procs = {i: start(i) for i in range(workers)}
    log.info("proxy workers started: %s", ", ".join(str(p.pid) for p in procs.values()))
    deaths: collections.deque[float] = collections.deque()
    restart_at: dict[int, float] = {}
    code = 0
    try:
        while not stop:
            now = time.monotonic()
            for i, p in procs.items():
                if i not in restart_at and (rc := p.poll()) is not None:
                    deaths.append(now)
                    while deaths and deaths[0] < now - CRASH_WINDOW_S:
                        deaths.popleft()
                    log.error("proxy worker %d (pid %d) exited with %s", i, p.pid, rc)
                    restart_at[i] = now + RESTART_DELAY_S
            if len(deaths) >= CRASH_LIMIT:
                log.error("%d proxy worker deaths within %gs: stopping", len(deaths), CRASH_WINDOW_S)
                code = 1
                break
            for i, at in list(restart_at.items()):
                if now >= at:
                    procs[i] = start(i)
                    del restart_at[i]
                    log.info("proxy worker %d started again (pid %d)", i, procs[i].pid)
            time.sleep(POLL_S)
    finally:
        _stop_all([p for i, p in procs.items() if i not in restart_at], stop[0] if stop else signal.SIGTERM)
        shutil.rmtree(shared, ignore_errors=True)
    return code


def _sweep_stale(tmp: Path) -> None:
    """Remove the snapshot directories of parents that are gone (SIGKILLed: they could not)."""
    for path in tmp.glob(f"{SHARED_PREFIX}*-*"):
        pid = path.name[len(SHARED_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _stop_all(procs: list[subprocess.Popen[bytes]], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("proxy worker pid %d still running %gs after the signal: killing it", p.pid, STOP_GRACE_S)
            p.kill()
            p.wait()


class Worker:
    """A worker's part (app state `WORKER`): its snapshots for the others, theirs for its
    `/metrics`, and the watch on its parent."""

    def __init__(self, index: int, shared: Path, parent: int, metrics: ProxyMetrics) -> None:
        self.index, self.shared, self.metrics = index, shared, metrics
        self.path = shared / f"worker-{index}.json"
        self.parent = parent  # given, not read: it may be gone before this worker gets here
        with contextlib.suppress(OSError, ValueError):
            metrics.resume(json.loads(self.path.read_bytes()))
        metrics.peers = self.peers

    def peers(self) -> list[Snapshot]:
        out = []
        for path in self.shared.glob("worker-*.json"):
            if path != self.path:
                with contextlib.suppress(OSError, ValueError):
                    out.append(json.loads(path.read_bytes()))
        return out

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics.snapshot(), separators=(",", ":")))
        os.replace(tmp, self.path)

    async def run(self) -> None:
        """Snapshots every SNAPSHOT_S; a SIGTERM to itself once the parent is gone."""
        while True:
            if os.getppid() != self.parent:
                log.warning("proxy worker %d: its parent (pid %d) is gone: stopping", self.index, self.parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                self.write()
            except OSError as exc:
                log.warning("proxy worker %d cannot write its metrics snapshot: %s", self.index, exc)
            await asyncio.sleep(min(SNAPSHOT_S, PARENT_CHECK_S))


WORKER = web.AppKey("worker", Worker)


async def worker_duties(app: web.Application) -> AsyncIterator[None]:
    """The cleanup context of a worker's app (`app[WORKER]` set)."""
    task = asyncio.create_task(app[WORKER].run())
    yield
    await stop_tasks([task], "the worker's duties", log)
