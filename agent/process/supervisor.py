"""One managed process: spawn, watch, probe, restart with backoff, stop the whole tree.

Exit codes follow Python's convention: a process killed by signal N is reported as `-N`
(SIGKILL: -9). An adopted process's exit code cannot be known (it is not our child): it is
reported as None with a message saying so. The watching itself is `agent.process.child`.

An exit is reported at once (no pid, its exit code and why): a dead engine must not read as
`ready` while what it left behind (workers ignoring SIGTERM) is being stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import structlog

from agent.process import drain, logs, proctree, secrets
from agent.process.child import Child, probe_once
from agent.process.failures import Failures, escalation
from agent.process.statefile import ProcRecord, ProcStore
from pdsupervisor.core.exits import AGENT_MARK, failure_reason, spoken_duration
from pdsupervisor.core.models import ProcessSpec, ProcessState, ProcessStatus, StopEscalation
from pdsupervisor.host.files import atomic_write

log = structlog.get_logger("agent.process.supervisor")

# Never handed to a child: a child speaking for the agent's systemd unit is a known bug, and
# the agent's credentials go to a child only one by one, as `{credential: NAME}` env values.
STRIPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                secrets.CREDENTIALS_ENV)
UNHEALTHY_AFTER = 3  # consecutive failed probes before a ready process is reported running
# Until first ready, re-probe every STARTUP_PROBE_S (or the probe's period, if shorter):
# readiness is what releases the next start stage, and a local probe costs next to nothing.
STARTUP_PROBE_S = 0.1
TAIL_LINES = 200  # of a process's log read for why it exited (a traceback's header, often)


def child_env(spec_env: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **spec_env}
    for k in STRIPPED_ENV:
        env.pop(k, None)
    return env


def spawn_error(exc: Exception) -> str:
    """Why a start failed, for the status message: an OSError says it itself (errno, path);
    anything else is named by its type too (`ValueError: embedded null byte`)."""
    return str(exc) if isinstance(exc, OSError | secrets.EnvFileError) else f"{type(exc).__name__}: {exc}"


def backoff_delay(policy_initial: float, multiplier: float, maximum: float, jitter: float, attempt: int) -> float:
    base = min(maximum, policy_initial * (multiplier ** attempt))
    return max(0.0, base * (1 + jitter * random.uniform(-1, 1)))


def backoff_message(why: str, delay: float, attempt: int) -> str:
    """The status message while waiting to restart (`pdsupervisor.cli.progress` leaves its
    countdown out of the `--wait` line)."""
    at = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
    return f"{why}; next attempt at {at} (in {delay:.1f}s, attempt {attempt})"


class ManagedProcess:
    """Keeps one `ProcessSpec` running on this node; reports a `ProcessStatus`.

    `start()` launches the supervision task; `stop()` stops the whole tree and forgets the
    process (the assignment dropped it), `stop(drain=True)` empties it first; `detach()`
    stops supervising but leaves the process running (agent shutdown: engines outlive the
    agent). `published()` returns once the status as it is now is where the proxy reads it
    (the node's status in etcd, for the reconciler's processes).
    """

    def __init__(
        self,
        spec: ProcessSpec,
        *,
        records: ProcStore,
        log_dir: Path,
        on_change: Callable[[], None] = lambda: None,
        adopt: tuple[ProcRecord, psutil.Process] | None = None,
        on_stop_escalated: Callable[[StopEscalation], None] = lambda e: None,
        published: Callable[[], Awaitable[None]] = lambda: asyncio.sleep(0),
    ) -> None:
        self.spec = spec
        self.records = records
        self.log_path = log_dir / f"{spec.name}.log"
        self.on_change = on_change
        self.on_stop_escalated = on_stop_escalated
        self.published = published
        self.state = ProcessState.starting
        self.message = ""
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.started_at: float | None = None
        self.ready_lost_at: float | None = None  # wall clock; see ProcessStatus.ready_lost_at
        self.failures = Failures()
        self.last_stop: str | None = None  # see ProcessStatus.last_stop
        self._started_mono: float | None = None
        self.ready_after_s: float | None = None  # see ProcessStatus.ready_after_s
        # a new spec the assignment asks for and this node refused (see `hold`)
        self.refused_spec_hash: str | None = None
        self.refused: str | None = None
        self.child: Child | None = None
        self._task: asyncio.Task[None] | None = None
        # stopping what an exited run left behind, then reaping it: see `_ended`
        self._cleanup: asyncio.Task[None] | None = None
        self.spec_hash = spec.spec_hash()
        self.log = log.bind(process=spec.name)
        # Adopted here, not in the task: a stop() before the task ever ran still finds the
        # process (and stops it) instead of forgetting it.
        if adopt is not None:
            self._adopt_child(*adopt)

    # ---- public ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def status(self) -> ProcessStatus:
        s = self.spec
        up = time.monotonic() - self._started_mono if self.child and self._started_mono else None
        return ProcessStatus(
            name=s.name, role=s.role, state=self.state, pid=self.pid, restarts=self.restarts,
            last_exit_code=self.last_exit_code, started_at=self.started_at if self.child else None,
            uptime_s=round(up, 1) if up is not None else None, spec_hash=self.spec_hash,
            generation=s.generation, endpoint=s.endpoint, dp_rank=s.dp_rank, message=self.message,
            ready_lost_at=self.ready_lost_at, last_stop=self.last_stop,
            ready_after_s=self.ready_after_s if self.child else None, refused_spec_hash=self.refused_spec_hash,
            refused=self.refused, **self.failures.status_fields(),
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"proc:{self.name}")

    def update_spec(self, spec: ProcessSpec) -> None:
        """Same hash, new metadata (generation): keep the process, remember the new spec
        (the caller reports the status change)."""
        assert spec.spec_hash() == self.spec_hash
        self.spec = spec
        if self.child:
            self._save_record()

    def hold(self, refused_hash: str | None, why: str | None = None) -> None:
        """The assignment asks for a new spec (`refused_hash`) this node refused: this one
        keeps running as it is, its status says what was refused and why. None: the
        assignment asks for this one (again)."""
        self.refused_spec_hash, self.refused = refused_hash, why

    async def stop(self, *, drain: bool = False) -> None:
        """Stop the supervision and the whole process tree; forget the process. With `drain`
        (a planned stop), a ready process with a `drain` spec is emptied first (`_drain`)."""
        if drain:
            await self._drain()
        await self._cancel_task()
        await self._leftovers_stopped()
        child, how = self.child, None
        if child is not None:
            self._set(ProcessState.stopping, f"stopping with {self.spec.stop_signal}")
            how = await self._stop_tree(child, self.spec.stop_timeout_s)
            child.detach()
            rc = await child.reap()
            self.last_exit_code = rc if rc is not None else self.last_exit_code
            self.child = None
        self.records.remove(self.name)
        self._set(ProcessState.exited, f"stopped: {how}" if how else "stopped")

    async def _drain(self) -> None:
        """A planned stop of a ready process with a `drain` spec: out of the proxy's rotation
        (`stopping`), then until its requests in flight are done (`drain.empty`). Only a ready
        process served anything: no drain otherwise. A drain cut short is noted in its log."""
        d, child = self.spec.drain, self.child
        if d is None or child is None or self.state != ProcessState.ready:
            return
        url = None if self.spec.port is None else f"http://{self.spec.host}:{self.spec.port}{d.path}"
        try:
            how = await drain.empty(d, url, say=lambda n: self._set(ProcessState.stopping, drain.message(n)),
                                    published=self.published, serving=lambda: self.child is child, log=self.log)
        except Exception:  # a bug here must not keep the process from stopping
            self.log.exception("drain failed; stopping now")
            return
        if how:
            self._note(f"{self.name}: {how}")

    async def detach(self) -> None:
        """Stop supervising, leave the process running (its record stays for adoption).

        The stop of an exited run's leftovers is given up too: a shutdown does not wait for
        it (its record stays as well)."""
        await self._cancel_task()
        if self._cleanup is not None:
            self._cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup
            self._cleanup = None
        if self.child:
            self.child.detach()

    # ---- internals ---------------------------------------------------------------

    async def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _set(self, state: ProcessState, message: str = "") -> None:
        if state != ProcessState.running:  # ready again, or this run is over
            self.ready_lost_at = None
        if state == ProcessState.ready and self.state != ProcessState.ready:
            self.failures.ready(time.time())
            if self.ready_after_s is None and self.child is not None and self.child.popen is not None:
                self.ready_after_s = round(time.monotonic() - (self._started_mono or time.monotonic()), 1)
        self.state, self.message = state, message
        self.on_change()

    def _note(self, what: str) -> None:
        """A line of the agent's own in the process's log, where people read its output."""
        try:
            fd = logs.open_log(self.log_path)
            try:
                os.write(fd, f"{AGENT_MARK}{what} ---\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:  # the log cannot be written: the status still says it
            self.log.warning("cannot write to the process log", error=str(exc))

    async def _stop_tree(self, child: Child, timeout: float) -> str | None:
        """Stop `child`'s whole tree with the stop signal, SIGKILL after `timeout`; how it
        ended when SIGKILL had to (logged, noted in the process log, reported), else None."""
        sig = signal.Signals[self.spec.stop_signal]
        done = await proctree.stop_tree(child.pid, child.create_time, sig, timeout)
        if done.left:
            self.log.error("processes survived SIGKILL", pids=[p.pid for p in done.left])
        if not done.escalated:
            return None
        how = escalation(child.pid, sig, timeout, done.escalated)
        self.log.warning("stop escalated to SIGKILL", how=how, pids=[p.pid for p in done.escalated])
        self._note(f"{self.name}: {how}")
        self.last_stop = how
        self.on_stop_escalated(StopEscalation(process=self.name, at=time.time(), how=how))
        return how

    def _save_record(self) -> None:
        assert self.child is not None
        self.records.save(ProcRecord(
            name=self.name, pid=self.child.pid, create_time=self.child.create_time,
            spec_hash=self.spec_hash, spec=self.spec.model_dump(mode="json"),
            started_at=self.started_at or time.time(), restarts=self.restarts, boot_id=proctree.boot_id(),
        ))

    def _write_files(self) -> None:
        for f in self.spec.files:  # a relative path is where the child sees it: under its cwd
            atomic_write(Path(self.spec.cwd or ".", f.path), f.content.encode(), f.mode)

    def _spawn(self) -> None:
        """Write the files, start the child, track it. Raises whatever stops it (the caller
        backs off): a NUL in argv or env (ValueError), a missing binary or cwd (OSError), an
        env file that cannot be read (EnvFileError)..."""
        self._note(f"starting {self.name} ({self.spec_hash}) at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        env = child_env(secrets.resolve_env(self.spec.env, os.environ.get(secrets.CREDENTIALS_ENV)))
        self._write_files()
        fd = logs.open_log(self.log_path)
        try:
            popen = subprocess.Popen(
                self.spec.argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                cwd=self.spec.cwd, env=env, start_new_session=True, close_fds=True,
            )
        finally:
            os.close(fd)
        try:
            self._track(popen)
        except Exception:
            # Started but not tracked (no adoption record, e.g. a full disk): it must not run
            # unseen beside the one the next attempt starts. Its own session: kill the group.
            if self.child is not None:
                self.child.detach()
                self.child = None
            with contextlib.suppress(OSError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            raise

    def _track(self, popen: subprocess.Popen[bytes]) -> None:
        proc = psutil.Process(popen.pid)
        try:
            start = proctree.started(popen.pid)  # our unreaped child: its /proc entry stays
        except psutil.NoSuchProcess:
            start = -1.0  # cannot happen before we reap it; never matches anything
        self.child = Child(proc, start, popen)
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.ready_after_s = None
        self._save_record()
        self.log.info("started", pid=popen.pid, argv=self.spec.argv)

    def _adopt_child(self, rec: ProcRecord, proc: psutil.Process) -> None:
        self.child = Child(proc, rec.create_time, None)
        self.restarts = rec.restarts
        self.started_at = rec.started_at
        # monotonic start derived from the recorded wall-clock start: only used for uptime
        self._started_mono = time.monotonic() - max(0.0, time.time() - rec.started_at)
        self.log.info("adopted", pid=rec.pid)

    async def _run(self) -> None:
        attempt = 0
        if self.child is not None:  # adopted: a child of our own is only spawned below
            self._set(ProcessState.running, "adopted")
        while True:
            if self.child is None:
                self._set(ProcessState.starting)
                try:
                    self._spawn()
                except Exception as exc:  # whatever it is, a failed start: never a dead loop
                    why = f"spawn failed: {spawn_error(exc)}"
                    self.log.warning("spawn failed", error=why)
                    self._note(why)  # after the start header: `logs` shows why, not headers alone
                    self.last_exit_code = None
                    self.failures.failed(why, time.time())
                    attempt = await self._backoff(attempt, why)
                    continue
                self._set(ProcessState.running)
            child = self.child
            assert child is not None
            prober = asyncio.create_task(self._probe(child))
            try:
                await self._watch(child)
            finally:
                prober.cancel()
            ran = time.monotonic() - (self._started_mono or time.monotonic())
            rc, why = await self._why_exited(child, ran)
            policy = self.spec.restart
            if policy.mode == "never" or (policy.mode == "on-failure" and rc == 0):
                final = ProcessState.exited if rc in (0, None) else ProcessState.failed
                if final == ProcessState.failed:
                    self.failures.failed(why, time.time())
                self._ended(child, rc)
                self._set(final, f"exited: {why}; restart policy {policy.mode}")
                await self._leftovers_stopped()
                await asyncio.Event().wait()  # until stopped or replaced by the reconciler
            if ran >= policy.reset_after_s:
                attempt = 0
            self.failures.failed(why, time.time())
            self._ended(child, rc)
            attempt = await self._backoff(attempt, why)  # says `backoff` before its first await

    async def _why_exited(self, child: Child, ran: float) -> tuple[int | None, str]:
        """The exit code of `child` (not reaped yet) and why it ended, logged and noted."""
        rc = await child.exit_code()
        tail = await asyncio.to_thread(logs.tail, self.log_path, TAIL_LINES)
        why = failure_reason(rc, tail, adopted=child.popen is None)
        self.log.warning("exited", pid=child.pid, exit_code=rc, ran_s=round(ran, 1), reason=why)
        self._note(f"{self.name} exited after {spoken_duration(ran)}: {why}")
        return rc, why

    def _ended(self, child: Child, rc: int | None) -> None:
        """The run is over: reported at once (no pid, its exit code). What it left behind
        (workers) is stopped meanwhile, while its unreaped zombie keeps the pid reserved (so
        its session and group still name only its own), and then it is reaped. Its record
        goes last, once nothing of the run is left."""
        self.child = None
        self.last_exit_code = rc
        self._cleanup = asyncio.create_task(self._stop_leftovers(child), name=f"leftovers:{self.name}")

    async def _stop_leftovers(self, child: Child) -> None:
        try:
            await self._stop_tree(child, min(self.spec.stop_timeout_s, 10))
        except Exception:  # never a dead supervision: it goes on to the next run
            self.log.exception("stopping what the exited process left failed")
        await child.reap()
        self.records.remove(self.name)

    async def _leftovers_stopped(self) -> None:
        """Until the last run's leftovers are stopped: before a new run, and before `stop()`
        says it is stopped. Shielded: a cancelled waiter does not cancel the stop itself."""
        if self._cleanup is not None:
            await asyncio.shield(self._cleanup)
            self._cleanup = None

    async def _watch(self, child: Child) -> None:
        """Until `child` exits; a run that lasts `reset_after_s` ends a row of failures."""
        try:
            async with asyncio.timeout(self.spec.restart.reset_after_s):
                await child.wait()
                return
        except TimeoutError:
            pass
        if self.failures.stable():
            self.on_change()
        await child.wait()

    async def _backoff(self, attempt: int, why: str) -> int:
        p = self.spec.restart
        delay = backoff_delay(p.initial_backoff_s, p.multiplier, p.max_backoff_s, p.jitter, attempt)
        self._set(ProcessState.backoff, backoff_message(why, delay, attempt + 1))
        begun = time.monotonic()
        await self._leftovers_stopped()  # a new run never beside the last one's leftovers
        await asyncio.sleep(max(0.0, delay - (time.monotonic() - begun)))
        self.restarts += 1
        return attempt + 1

    async def _probe(self, child: Child) -> None:
        p = self.spec.readiness
        if p is None:  # like Kubernetes: no readiness probe means ready once running
            self._set(ProcessState.ready, self.message if self.message == "adopted" else "")
            return
        failures = 0
        while True:  # cancelled by _run as soon as the child exits
            failures = 0 if await probe_once(p) else failures + 1
            self._probed(failures)
            if self.state == ProcessState.ready:
                await asyncio.sleep(max(p.period_s, 5.0))
            else:
                await asyncio.sleep(min(STARTUP_PROBE_S, p.period_s))

    def _probed(self, failures: int) -> None:
        """One readiness probe's verdict; `failures`: consecutive failed probes (0: it passed)."""
        if self.state == ProcessState.stopping:  # draining: out of rotation until it stops
            return
        if failures == 0:
            if self.state != ProcessState.ready:
                self._set(ProcessState.ready, "")
        elif self.state == ProcessState.ready and failures >= UNHEALTHY_AFTER:
            self.ready_lost_at = time.time()  # kept by _set while the state is running
            self._set(ProcessState.running, f"readiness probe failing ({failures}x)")
