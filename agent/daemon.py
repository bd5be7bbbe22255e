"""The Agent: one asyncio loop wiring registration, reconcile, status, the coordinator, logs and REST.

Its parts get what they share at construction (the `Store`, the `LeaseState`); its loops
are one named list, `root_tasks()`, each run guarded. Order at start: adopt recorded
processes (before anything talks to etcd), start the embedded etcd on a bootstrap node and
wait for it, then register, watch the assignment, report status and coordinate. Stopping
the agent never stops a process, and it does not revoke its lease: the member key outlives
the agent by the TTL, so a restart (upgrade, crash, `systemctl restart`) within the TTL
re-registers before anyone sees the node as lost, and costs nothing even under the
`replace` node-loss policy. Every child is left running for the next agent.
"""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent.admission import Admission
from agent.api.cluster import ClusterDocuments, cache_context, cluster_routes
from agent.config import AgentConfig
from agent.coordinator import CACHE_LINGER_S, Coordinator
from agent.etcd_security import check_etcd_security, etcd_access, etcd_store, server_tls
from agent.lease import LeaseState
from agent.metrics import AgentMetrics
from agent.notify import Notifier
from agent.process import logs
from agent.process.statefile import ProcStore
from agent.process.supervisor import ManagedProcess
from agent.reconciler import Reconciler
from agent.registration import Registration
from pdsupervisor import __version__
from pdsupervisor.aio.wait import cancel_and_wait
from pdsupervisor.core.etcd_access import TLS_FINGERPRINT_ENV
from pdsupervisor.core.etcd_command import cluster_token, etcd_argv
from pdsupervisor.core.models import NodeFacts, Probe, ProcessSpec, ProcessState, RestartPolicy
from pdsupervisor.host import probes
from pdsupervisor.store.cache import ClusterCache
from pdsupervisor.store.embedded import etcd_binary
from pdsupervisor.store.transport import files_fingerprint

log = structlog.get_logger("agent")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]
SHUTDOWN_TASK_WAIT_S = 5.0  # per group of background tasks, after their cancellation
# Cancelled (and waited for) before the other loops: it hands the leader key over at once.
STOPPED_FIRST = ("coordinator",)


class Agent:
    """The per-node daemon. What its parts and the REST handlers read:

    - `agent.store`: the agent's `Store` (the only etcd client of the process).
    - `agent.name`, `agent.config` (`AgentConfig`), `agent.facts()` (current `NodeFacts`).
    - `agent.lease`: the member lease (`LeaseState`: `lease_id`, None while unregistered;
      `registered`, set at the first registration; `ttl`).
    - `agent.registration`, `agent.reconciler` (`procs`: the managed processes by name,
      read-only for others), `agent.coordinator`.
    - `agent.stopping`: an `asyncio.Event` set when the agent is asked to stop; a handler
      that runs long (a log follower) ends when it is set.
    - `agent.routes`: the REST routes beside the node's own (the cluster API).
    - `agent.metrics`: its Prometheus registry (`GET /metrics`), fed by the store's and the
      coordinator's observer hooks and read from the parts above at scrape time.
    """

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        if config.ip is None:
            config = config.model_copy(update={"ip": probes.default_ip()})
        self.config = config
        self.name = config.name
        self.state_dir = Path(config.state_dir).absolute()  # it goes into specs and facts
        self.log_dir = self.state_dir / "logs"
        self.store = etcd_store(config)
        self.lease = LeaseState(config.ttl)
        self.notifier = notifier or Notifier()
        etcd_dir = Path(config.bootstrap_etcd.data_dir or self.state_dir / "etcd").absolute()
        # what an assignment may run here; no file of it in the agent's own directories
        self.admission = Admission(self.state_dir, config.allowed_commands, private_dirs=[
            self.state_dir / "procs", self.state_dir / "bootstrap", self.log_dir, etcd_dir])
        self.reconciler = Reconciler(
            self.name, self.store, ProcStore(self.state_dir / "procs"), self.log_dir, self.lease,
            admission=self.admission, heartbeat_s=config.status_heartbeat_s, resync_s=config.assignment_resync_s,
        )
        self.registration = Registration(self.store, self.facts, self.lease)
        # one watch-fed cache of the cluster, for the coordinator while it leads and for
        # `GET /cluster`; it runs only while used (an idle follower watches no status write)
        self.cache = ClusterCache(self.store, linger_s=CACHE_LINGER_S)
        # every agent runs the coordinator loop (it acts only as leader) and serves the cluster API
        self.coordinator = Coordinator(self.store, self.name, self.lease, cache=self.cache)
        self.documents = ClusterDocuments(self.cache)
        self.routes = cluster_routes(self.store, self.documents)
        self.bootstrap: ManagedProcess | None = None
        self.runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()  # set on SIGTERM/SIGINT; long-lived handlers end on it
        self.metrics = AgentMetrics(self)  # last: it reads the parts above
        self.store.on_request = self.metrics.etcd_request
        self.coordinator.on_cycle = self.metrics.coordinator_cycle

    def root_tasks(self) -> dict[str, TaskFactory]:
        """Every long-lived loop of the agent, by name, in start order (kopf's `spawn_tasks`).

        Each runs guarded: a bug in one is logged and that loop started again after a backoff.
        At shutdown `STOPPED_FIRST` are cancelled first, then the others.
        """
        return {
            "registration": self.registration.run,
            "assignment": self.reconciler.watch_assignment,
            "status": self.reconciler.report_status,
            "status-lease": self.reconciler.rewrite_status_on_new_lease,
            "logs": self._rotate_logs,
            "watchdog": self._watchdog,
            "ready": self._notify_ready,
            "coordinator": self.coordinator.run,
        }

    # ---- facts ---------------------------------------------------------------------

    def facts(self) -> NodeFacts:
        c = self.config
        return probes.node_facts(
            c.sys_root, name=self.name, ip=c.ip or "127.0.0.1", slots=c.accelerators,
            ips=probes.ipv4_addresses(), labels=c.labels, cpu_count=probes.cpu_count(),
            memory_bytes=probes.memory_bytes(), agent_version=__version__, api_url=self.api_url,
            state_dir=str(self.state_dir), python=sys.executable,
            etcd_access=etcd_access(self.config),
        )

    @property
    def api_url(self) -> str:
        return self.config.api_url(self.runner.addresses[0][1] if self.runner and self.runner.addresses else None)

    # ---- embedded etcd -------------------------------------------------------------

    def _etcd_spec(self) -> ProcessSpec:
        b = self.config.bootstrap_etcd
        host = b.members.get(self.name) or b.client_host or self.config.ip or "127.0.0.1"
        tls = server_tls(self.config)
        argv = etcd_argv(
            name=self.name, data_dir=b.data_dir or str(self.state_dir / "etcd"), client_host=host,
            client_port=b.client_port, peer_port=b.peer_port, extra=b.extra_args, binary=etcd_binary(),
            tls=tls, members=b.members or None, state=b.initial_cluster_state,
            token=cluster_token(self.config.cluster),
        )
        # replaced certificate files (rotation) change the spec, so the next agent start restarts etcd
        env = {TLS_FINGERPRINT_ENV: files_fingerprint(tls.ca_file, tls.cert_file) or "unreadable"} if tls else {}
        return ProcessSpec(
            name="etcd", role="etcd", argv=argv, env=env, host=host, port=b.client_port,
            readiness=Probe(kind="tcp", host=host, port=b.client_port, period_s=0.2),
            restart=RestartPolicy(initial_backoff_s=0.5, max_backoff_s=10, reset_after_s=60),
            stop_timeout_s=10,
        )

    async def _start_bootstrap_etcd(self) -> None:
        """Start (or adopt) the embedded etcd member. A one-member etcd is waited for: nothing
        else can answer. A member of several is not: it serves clients only once a quorum of
        members is up, and the other members' agents may be waiting for theirs just the same;
        the agent goes on with every member as an endpoint (the store skips a refusing one)."""
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
        if len(self.config.bootstrap_etcd.members) > 1:
            log.info("embedded etcd member started; not waiting for a quorum", endpoint=spec.endpoint,
                     adopted=adopt is not None, members=list(self.config.bootstrap_etcd.members))
            return
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
        await self.lease.registered.wait()
        self.notifier.ready(f"registered as {self.name}")

    async def _supervised(self, name: str, factory: TaskFactory) -> None:
        delay = 1.0
        while True:
            started = time.monotonic()
            try:
                await factory()
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
        for warning in check_etcd_security(self.config, "agent configuration"):
            log.warning("etcd without TLS: anyone on the network can read and write it, and so run code "
                        "as root on every node", problem=warning)
        app = build_app(self, self.routes)
        app.cleanup_ctx.append(cache_context(self.cache))
        # a request still running 3 s into shutdown is cancelled (aiohttp would wait 60 s)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=3.0)
        await self.runner.setup()
        rc = self.config.rest
        site = web.TCPSite(self.runner, rc.bind_host, rc.port, ssl_context=ssl_context(rc), reuse_address=True)
        await site.start()
        log.info("rest api listening", url=self.api_url, host=rc.bind_host,
                 credentials=[c for c, on in (("token", rc.token), ("client-certificate", rc.tls_client_ca)) if on])
        for warning in rc.security_warnings() + self.config.etcd_member_warnings():
            log.warning(warning)
        if self.config.bootstrap_etcd.enabled:
            await self._start_bootstrap_etcd()
        await self.store.connect()
        self._tasks = [asyncio.create_task(self._supervised(n, f), name=n) for n, f in self.root_tasks().items()]

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
        first = [t for t in self._tasks if t.get_name() in STOPPED_FIRST]
        for tasks in (first, [t for t in self._tasks if t not in first]):
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


