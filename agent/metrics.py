"""The agent's Prometheus metrics (`GET /metrics`), on a registry of its own (several agents
can live in one test process, and nothing else of the process leaks in).

What is state is read from the agent's live objects at scrape time (`_StateCollector`):
processes, registration and lease, etcd reachability, leadership, the leader's view of the
cluster. Nothing has to be kept in step along the code paths that change them. What are
events is recorded as it happens, through two observer hooks that keep prometheus out of
the modules that raise them: every etcd request (`Store.on_request`) and every coordinator
cycle (`Coordinator.on_cycle`).

Every agent metric has the `node` label (the agent's name); the cluster-wide ones also
`cluster`. README's "Metrics" section lists them; etc/prometheus/alerts.yml and
etc/grafana/pdsupervisor.json use them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.coordinator import Outcome, OutcomeKind
from pdsupervisor import __version__
from pdsupervisor.core.documents import Phase
from pdsupervisor.core.models import ProcessState, ProcessStatus

if TYPE_CHECKING:
    from agent.daemon import Agent

CONTENT_TYPE = CONTENT_TYPE_LATEST  # as the proxy answers
PROCESS_LABELS = ["node", "process", "role"]
# etcd answers a healthy request in about a millisecond; the store's own timeout is 3 s at most
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CYCLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CYCLE_RAISED = "error"  # the outcome label of a cycle that raised (a bug, logged)


class _StateCollector(Collector):
    """Everything that is state, read from the agent when Prometheus scrapes."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        yield from self._processes()
        yield from self._registration()
        yield from self._coordinator()

    def _statuses(self) -> list[ProcessStatus]:
        a = self._agent
        procs = [m.status() for m in a.reconciler.snapshot_procs()]
        return procs + ([a.bootstrap.status()] if a.bootstrap is not None else [])

    def _processes(self) -> Iterator[Metric]:
        node = self._agent.name
        state = GaugeMetricFamily("pdsupervisor_process_state", "1 for the state the supervised process is in, "
                                  "0 for the others.", labels=[*PROCESS_LABELS, "state"])
        ready = GaugeMetricFamily("pdsupervisor_process_ready", "1 while the process passes its readiness probe.",
                                  labels=PROCESS_LABELS)
        restarts = CounterMetricFamily("pdsupervisor_process_restarts", "Restarts by the agent since the process "
                                       "was assigned with its current spec.", labels=PROCESS_LABELS)
        exit_code = GaugeMetricFamily("pdsupervisor_process_last_exit_code", "Exit code of the process's last "
                                      "exit (-N: killed by signal N); absent before any.", labels=PROCESS_LABELS)
        uptime = GaugeMetricFamily("pdsupervisor_process_uptime_seconds", "Seconds since the running process "
                                   "started; absent while none runs.", labels=PROCESS_LABELS)
        for p in self._statuses():
            labels = [node, p.name, p.role]
            for s in ProcessState:
                state.add_metric([*labels, s.value], 1 if p.state == s else 0)
            ready.add_metric(labels, 1 if p.state == ProcessState.ready else 0)
            restarts.add_metric(labels, p.restarts)
            if p.last_exit_code is not None:
                exit_code.add_metric(labels, p.last_exit_code)
            if p.uptime_s is not None:
                uptime.add_metric(labels, p.uptime_s)
        yield from (state, ready, restarts, exit_code, uptime)

    def _registration(self) -> Iterator[Metric]:
        a = self._agent
        node = [a.name]
        info = GaugeMetricFamily("pdsupervisor_agent_info", "The agent: its cluster and version (always 1).",
                                 labels=["node", "cluster", "version"])
        info.add_metric([a.name, a.config.cluster, __version__], 1)
        registered = GaugeMetricFamily("pdsupervisor_registered", "1 while the agent holds its member lease "
                                       "(the node is registered).", labels=["node"])
        registered.add_metric(node, 0 if a.lease.lease_id is None else 1)
        ttl = GaugeMetricFamily("pdsupervisor_lease_ttl_seconds", "TTL the member lease is granted with.",
                                labels=["node"])
        ttl.add_metric(node, a.lease.ttl)
        age = GaugeMetricFamily("pdsupervisor_lease_refresh_age_seconds", "Seconds since etcd last confirmed the "
                                "member lease; absent before the first registration.", labels=["node"])
        if a.registration.last_refresh_mono is not None:
            age.add_metric(node, time.monotonic() - a.registration.last_refresh_mono)
        reachable = GaugeMetricFamily("pdsupervisor_etcd_reachable", "1 while etcd confirmed the member lease "
                                      "within its TTL (GET /healthz etcd_reachable).", labels=["node"])
        reachable.add_metric(node, 1 if a.registration.healthy else 0)
        yield from (info, registered, ttl, age, reachable)

    def _coordinator(self) -> Iterator[Metric]:
        a, c = self._agent, self._agent.coordinator
        cluster = a.config.cluster
        leader = GaugeMetricFamily("pdsupervisor_coordinator_is_leader", "1 on the agent whose coordinator "
                                   "holds the leader key.", labels=["node", "cluster"])
        leader.add_metric([a.name, cluster], 1 if c.is_leader else 0)
        writes = CounterMetricFamily("pdsupervisor_coordinator_assignment_writes", "Assignment keys written or "
                                     "deleted by this agent's coordinator as leader.", labels=["node", "cluster"])
        writes.add_metric([a.name, cluster], c.assignment_writes)
        phase = GaugeMetricFamily("pdsupervisor_cluster_phase", "1 for the cluster's phase, 0 for the others, "
                                  "as the leader saw it last (exported by the leader only).", labels=["cluster", "phase"])
        node_registered = GaugeMetricFamily(
            "pdsupervisor_cluster_node_registered", "For each node with an assignment: 1 while it is registered, "
            "0 when lost, as the leader saw it last (exported by the leader only).", labels=["cluster", "node"])
        unmanaged = GaugeMetricFamily(
            "pdsupervisor_cluster_node_unmanaged", "For each node with an assignment: 1 while its agent is away but "
            "an engine of it still answers (it serves, it is not replaced), as the leader saw it last (exported by "
            "the leader only).", labels=["cluster", "node"])
        outdated = GaugeMetricFamily(
            "pdsupervisor_rollout_engines_outdated", "Engines of the role still to change to the current spec (or "
            "Mooncake master epoch) in a rollout, as the leader saw it last (exported by the leader only).",
            labels=["cluster", "role"])
        halted = GaugeMetricFamily("pdsupervisor_rollout_halted", "1 while a rollout is halted: an engine failed with "
                                   "its new spec (`pdsupervisor status` says which and why); exported by the leader only.",
                                   labels=["cluster"])
        view = c.view if c.is_leader else None
        if view is not None:
            for ph in get_args(Phase):
                phase.add_metric([cluster, ph], 1 if view.phase == ph else 0)
            for node, up in sorted(view.registered.items()):
                node_registered.add_metric([cluster, node], 1 if up else 0)
                unmanaged.add_metric([cluster, node], 1 if node in view.unmanaged else 0)
            for role, count in view.outdated:
                outdated.add_metric([cluster, role], count)
            halted.add_metric([cluster], 1 if view.halted else 0)
        yield from (leader, writes, phase, node_registered, unmanaged, outdated, halted)


class AgentMetrics:
    """The agent's registry, its event metrics, and the hooks that feed them."""

    def __init__(self, agent: Agent) -> None:
        self.node = agent.name
        self.cluster = agent.config.cluster
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.etcd_latency = Histogram(
            "pdsupervisor_etcd_request_duration_seconds", "etcd requests that got an answer, by operation (the "
            "gateway path after /v3/); watch streams are not counted.", ["node", "op"], buckets=ETCD_BUCKETS, registry=r)
        self.etcd_failures = Counter("pdsupervisor_etcd_request_failures", "etcd requests that got no answer "
                                     "(unreachable, timed out, cut off), by operation.", ["node", "op"], registry=r)
        self.cycle_duration = Histogram("pdsupervisor_coordinator_cycle_duration_seconds", "Coordinator cycles, "
                                        "follower ones too.", ["node", "cluster"], buckets=CYCLE_BUCKETS, registry=r)
        self.cycles = Counter("pdsupervisor_coordinator_cycles", "Coordinator cycles by outcome (agent/coordinator.py "
                              "OutcomeKind; error: the cycle raised).", ["node", "cluster", "outcome"], registry=r)
        self._cycle_children = {k: self.cycles.labels(self.node, self.cluster, k)  # each outcome counted from 0
                                for k in (*get_args(OutcomeKind), CYCLE_RAISED)}
        self._cycle_timer = self.cycle_duration.labels(self.node, self.cluster)
        self._etcd_children: dict[tuple[str, bool], Histogram | Counter] = {}
        r.register(_StateCollector(agent))
        ProcessCollector(registry=r)  # the agent's own RSS, CPU and open files (process_*)

    def etcd_request(self, path: str, seconds: float, answered: bool) -> None:
        """`Store.on_request`: one etcd request, timed."""
        child = self._etcd_children.get((path, answered))
        if child is None:
            op = path.removeprefix("/v3/")
            child = self._etcd_children[(path, answered)] = (
                self.etcd_latency.labels(self.node, op) if answered else self.etcd_failures.labels(self.node, op))
        if isinstance(child, Histogram):
            child.observe(seconds)
        else:
            child.inc()

    def coordinator_cycle(self, outcome: Outcome | None, seconds: float) -> None:
        """`Coordinator.on_cycle`: one cycle (None: it raised), timed."""
        self._cycle_timer.observe(seconds)
        self._cycle_children[outcome.kind if outcome is not None else CYCLE_RAISED].inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of everything above."""
        return generate_latest(self.registry)
