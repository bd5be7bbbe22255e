"""Prometheus metrics of the proxy, on a registry of its own (several proxies per test process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdsupervisor.proxy.instances import ROLES, Registry

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _InstanceCollector(Collector):
    """In-flight and ejection per instance, and instances in rotation per role (0 too: an
    alert on a role left without instances needs the sample) and how many of those are routed
    on the last status of an agent that is away, read from the registry at scrape time; under
    `--policy prefix`, how prefills were routed."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        inflight = GaugeMetricFamily("pdproxy_instance_inflight", "Requests in flight per instance.", labels=["role", "instance"])
        ejected = GaugeMetricFamily("pdproxy_instance_ejected", "1 if the instance is ejected.", labels=["role", "instance"])
        available = GaugeMetricFamily("pdproxy_available_instances", "Instances of the role in rotation "
                                      "(not ejected).", labels=["role"])
        last_known = GaugeMetricFamily("pdproxy_last_known_instances", "Instances of the role in rotation whose "
                                       "node's agent is away (routed on its last status).", labels=["role"])
        for inst in self._registry.instances():
            inflight.add_metric([inst.role, inst.endpoint], inst.inflight)
            ejected.add_metric([inst.role, inst.endpoint], 1 if inst.ejected else 0)
        for role in ROLES:
            healthy = self._registry.healthy(role)
            available.add_metric([role], len(healthy))
            last_known.add_metric([role], sum(1 for i in healthy if i.source == "last-known"))
        yield inflight
        yield ejected
        yield available
        yield last_known
        if self._registry.policy == "prefix":
            routed = CounterMetricFamily("pdproxy_prefix_routed", "Prefills routed by --policy prefix: to the instance "
                                         "holding the longest prefix (hit), by load as it was too busy (busy) or as "
                                         "none held one (miss).", labels=["outcome"])
            for outcome, n in self._registry.prefix_routed.items():
                routed.add_metric([outcome], n)
            yield routed


class ProxyMetrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pdproxy_requests", "Client requests by route and status.", ["route", "status"], registry=r)
        self.errors = Counter("pdproxy_errors", "Failures by kind.", ["kind"], registry=r)
        self.ejections = Counter(
            "pdproxy_ejections", "Instances taken out of rotation, by role and reason (an exchange's outcome: "
            "conn_error, 5xx, timeout, models; or a probe's: probe_unreachable, probe_status, probe_no_answer).",
            ["role", "reason"], registry=r,
        )
        self.upstream = Counter(
            "pdproxy_upstream_requests", "Upstream requests by instance and outcome.", ["role", "instance", "outcome"], registry=r
        )
        self.ttft = Histogram("pdproxy_time_to_first_token_seconds", "Time to the first byte sent to the client.", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("pdproxy_request_latency_seconds", "Whole request latency.", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.instance_latency = Histogram(
            "pdproxy_upstream_latency_seconds", "Upstream request latency per instance.", ["role", "instance"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        r.register(_InstanceCollector(registry))
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`.labels()` is slow-ish; cache the children on the hot path."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c
