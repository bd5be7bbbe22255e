"""The Agent: one asyncio loop wiring registration, reconcile, status, logs and REST.

Order at start: adopt recorded processes (before anything talks to etcd), start the
embedded etcd on a bootstrap node and wait for it, then register, watch the assignment and
report status. Stopping the agent never stops a process, and it does not revoke its lease:
the member key outlives the agent by the TTL, so a restart (upgrade, crash, `systemctl
restart`) within the TTL re-registers before anyone sees the node as lost, and costs nothing
even under the `replace` node-loss policy. Every child is left running for the next agent.
"""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from agent.config import AgentConfig
from agent.notify import Notifier
from agent.process import logs
from agent.process.statefile import ProcStore
from agent.process.supervisor import ManagedProcess
from agent.reconciler import Reconciler
from agent.registration import Registration
from pdsupervisor import __version__
from pdsupervisor.aio.wait import cancel_and_wait
from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.core.models import NodeFacts, Probe, ProcessSpec, ProcessState, RestartPolicy
from pdsupervisor.host import probes
from pdsupervisor.store.embedded import etcd_binary
from pdsupervisor.store.etcd import Store, lease_refresh_interval

log = structlog.get_logger("agent")

TaskFactory = Callable[["Agent"], Awaitable[None]]
SHUTDOWN_TASK_WAIT_S = 5.0  # per group of background tasks, after their cancellation


def store_timeout(ttl: int) -> float:
    """Per-call etcd timeout: a refresh every ttl/3 plus two timed-out calls still fit in the
    TTL (Patroni's `loop_wait + 2 * retry_timeout <= ttl`)."""
    return min(3.0, lease_refresh_interval(ttl))


class Agent:
    """The per-node daemon. Extension points for the coordinator (and anything else):

    - `agent.store`: the agent's `Store` (the only etcd client of the process).
    - `agent.name`, `agent.config` (`AgentConfig`), `agent.facts()` (current `NodeFacts`).
    - `agent.lease_id`: the current lease (None while unregistered; it changes after a lost
      lease is replaced). `await agent.wait_registered()` waits for the first one.
    - `agent.follow_ttl(ttl)`: take the cluster spec's lease TTL (the coordinator calls it).
    - `agent.add_task(factory, name)`: before `run()`, add a background task
      `factory(agent) -> coroutine` run in the agent's loop; if it raises, it is logged and
      started again after a backoff; it is cancelled first at shutdown.
    - `agent.stopping`: an `asyncio.Event` set when the agent is asked to stop; a handler
      that runs long (a log follower) ends when it is set.
    - `agent.add_routes(routes)`: before `run()`, extra aiohttp `RouteDef`s for the REST app
      (mutating methods are guarded by the token middleware; `agent.api.app.require_token`
      guards a read).
    - `agent.reconciler.procs`: the managed processes by name (read-only for others).
    """

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        if config.ip is None:
            config = config.model_copy(update={"ip": probes.default_ip()})
        self.config = config
        self.name = config.name
        self.state_dir = Path(config.state_dir).absolute()  # it goes into specs and facts
        self.log_dir = self.state_dir / "logs"
        self.store = Store(config.etcd, config.cluster, timeout_s=store_timeout(config.ttl))
        self.notifier = notifier or Notifier()
        self.reconciler = Reconciler(
            self.name, self.store, ProcStore(self.state_dir / "procs"), self.log_dir,
            heartbeat_s=config.status_heartbeat_s, resync_s=config.assignment_resync_s,
        )
        self.registration = Registration(self.store, self.facts, config.ttl, self._registered)
        self.reconciler.lease_of = lambda: self.registration.lease_id
        self.bootstrap: ManagedProcess | None = None
        self.runner: web.AppRunner | None = None
        self._task_factories: list[tuple[str, TaskFactory]] = []
        self._extra_routes: list[web.RouteDef] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._extra_tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()  # set on SIGTERM/SIGINT; long-lived handlers end on it

    # ---- extension points ----------------------------------------------------------

    @property
    def lease_id(self) -> int | None:
        return self.registration.lease_id

    async def wait_registered(self) -> None:
        await self.registration.registered.wait()

    def add_task(self, factory: TaskFactory, name: str = "extra") -> None:
        self._task_factories.append((name, factory))

    def add_routes(self, routes: list[web.RouteDef]) -> None:
        self._extra_routes.extend(routes)

    def follow_ttl(self, ttl: int) -> None:
        """The cluster spec's lease TTL: member lease and etcd call timeouts follow it."""
        self.store.timeout_s = store_timeout(ttl)
        self.registration.set_ttl(ttl)

    # ---- facts ---------------------------------------------------------------------

    def facts(self) -> NodeFacts:
        c = self.config
        return probes.node_facts(
            c.sys_root, name=self.name, ip=c.ip or "127.0.0.1", slots=c.accelerators,
            ips=probes.ipv4_addresses(), labels=c.labels, cpu_count=probes.cpu_count(),
            memory_bytes=probes.memory_bytes(), agent_version=__version__, api_url=self.api_url,
            state_dir=str(self.state_dir), python=sys.executable,
        )

    @property
    def api_url(self) -> str:
        return self.config.api_url(self.runner.addresses[0][1] if self.runner and self.runner.addresses else None)

    def _registered(self, lease: int) -> None:
        self.reconciler.mark_dirty()  # status under the new lease (see Reconciler._comparable)

    # ---- embedded etcd -------------------------------------------------------------

    def _etcd_spec(self) -> ProcessSpec:
        b = self.config.bootstrap_etcd
        host = b.client_host or self.config.ip or "127.0.0.1"
        argv = etcd_argv(
            name=self.name, data_dir=b.data_dir or str(self.state_dir / "etcd"), client_host=host,
            client_port=b.client_port, peer_port=b.peer_port, extra=b.extra_args, binary=etcd_binary(),
        )
        return ProcessSpec(
            name="etcd", role="etcd", argv=argv, host=host, port=b.client_port,
            readiness=Probe(kind="tcp", host=host, port=b.client_port, period_s=0.2),
            restart=RestartPolicy(initial_backoff_s=0.5, max_backoff_s=10, reset_after_s=60),
            stop_timeout_s=10,
        )

    async def _start_bootstrap_etcd(self) -> None:
        spec = self._etcd_spec()
        records = ProcStore(self.state_dir / "bootstrap")
        adopt = None
        for rec, proc in records.live():
            if rec.spec_hash == spec.spec_hash():
                adopt = (rec, proc)
            else:  # our etcd, but configured differently now: restart it
                await ManagedProcess(rec.process_spec, records=records, log_dir=self.log_dir, adopt=(rec, proc)).stop()
        changed = asyncio.Event()  # not the reconciler's: etcd is not in the node's status
        self.bootstrap = ManagedProcess(spec, records=records, log_dir=self.log_dir, on_change=changed.set, adopt=adopt)
        self.bootstrap.start()
        self.notifier.status("waiting for the embedded etcd")
        while self.bootstrap.state != ProcessState.ready:
            await changed.wait()
            changed.clear()
        log.info("embedded etcd ready", endpoint=spec.endpoint, adopted=adopt is not None)

    # ---- background loops ----------------------------------------------------------

    async def _rotate_logs(self) -> None:
        lc = self.config.logs
        while True:
            await asyncio.sleep(lc.check_interval_s)
            for path in list(self.log_dir.glob("*.log")):
                try:
                    # a copy of a large log must not stall lease refreshes and probes
                    if await asyncio.to_thread(logs.rotate_if_needed, path, lc.max_bytes, lc.keep):
                        log.info("log rotated", path=str(path))
                except OSError as exc:
                    log.warning("log rotation failed", path=str(path), error=str(exc))

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _notify_ready(self) -> None:
        await self.wait_registered()
        self.notifier.ready(f"registered as {self.name}")

    async def _supervised(self, name: str, factory: TaskFactory) -> None:
        delay = 1.0
        while True:
            started = time.monotonic()
            try:
                await factory(self)
                log.debug("background task finished", task=name)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task failed, restarting", task=name, retry_in=delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            await asyncio.sleep(delay)

    # ---- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        from agent.api.app import build_app, ssl_context

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        adopted = self.reconciler.adopt()  # before etcd is even contacted
        log.info("agent starting", name=self.name, cluster=self.config.cluster, adopted=adopted)
        app = build_app(self, self._extra_routes)
        # a request still running 3 s into shutdown is cancelled (aiohttp would wait 60 s)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=3.0)
        await self.runner.setup()
        rc = self.config.rest
        site = web.TCPSite(self.runner, rc.host, rc.port, ssl_context=ssl_context(rc), reuse_address=True)
        await site.start()
        log.info("rest api listening", url=self.api_url)
        if self.config.bootstrap_etcd.enabled:
            await self._start_bootstrap_etcd()
        await self.store.connect()
        spawn = asyncio.create_task
        core: list[tuple[str, TaskFactory]] = [  # a bug in one loop is logged and the loop restarted
            ("registration", lambda a: a.registration.run()),
            ("assignment", lambda a: a.reconciler.watch_assignment()),
            ("status", lambda a: a.reconciler.report_status()),
            ("logs", lambda a: a._rotate_logs()),
            ("watchdog", lambda a: a._watchdog()),
            ("ready", lambda a: a._notify_ready()),
        ]
        self._tasks += [spawn(self._supervised(n, f), name=n) for n, f in core]
        self._extra_tasks += [spawn(self._supervised(n, f), name=n) for n, f in self._task_factories]

    def request_stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Start, wait for `request_stop()` (SIGTERM/SIGINT in main), shut down. A stop asked
        for while starting (an embedded etcd that never gets ready) ends the start."""
        starting = asyncio.ensure_future(self.start())
        stop_asked = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({starting, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # raise what went wrong
                await stop_asked
        finally:
            await cancel_and_wait([starting, stop_asked], SHUTDOWN_TASK_WAIT_S)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Leave every child running and the lease to expire by itself (see the module docstring)."""
        self.stopping.set()  # however we got here: long-lived handlers end on it
        self.notifier.stopping()
        # the coordinator first: it may still want the store
        for tasks in (self._extra_tasks, self._tasks):
            for stuck in await cancel_and_wait(tasks, SHUTDOWN_TASK_WAIT_S):
                stack = io.StringIO()
                stuck.print_stack(file=stack)
                log.error("task did not stop when cancelled; going on", task=stuck.get_name(), stack=stack.getvalue())
        await self.reconciler.detach_all()
        if self.bootstrap is not None:
            await self.bootstrap.detach()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.store.close()
        log.info("agent stopped; processes left running", processes=list(self.reconciler.procs))


def install_signal_handlers(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)


