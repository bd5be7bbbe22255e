"""Prometheus metrics of the proxy, on a registry of its own (several proxies per test process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pdsupervisor.proxy.instances import ROLES, Registry

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _InstanceCollector(Collector):
    """In-flight and ejection per instance, and instances in rotation per role (0 too: an
    alert on a role left without instances needs the sample) and how many of those are routed
    on the last status of an agent that is away, read from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
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


class Counter:
    """A counter by label values, kept as plain numbers: `inc` is a dict update (prometheus-client's
    takes a lock and walks its child objects, a few us each: 7 counts and observations a request
    made them 15 % of the proxy's CPU). Exposed at scrape time by `ProxyMetrics`."""

    def __init__(self, name: str, doc: str, labels: list[str]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + 1.0

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self.values.items():
            fam.add_metric(list(labels), value)
        return fam


class Histogram:
    """A histogram by label values: per series, its count per bucket (not cumulative) and its sum."""

    def __init__(self, name: str, doc: str, labels: list[str], buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        self.series: dict[tuple[str, ...], list[float]] = {}  # labels -> [count per bucket..., +Inf's, sum]

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, value)] += 1
        series[-1] += value

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        bounds = [*map(floatToGoString, self.buckets), "+Inf"]
        for labels, series in self.series.items():
            fam.add_metric(list(labels), list(zip(bounds, accumulate(series[:-1]), strict=True)), series[-1])
        return fam


class ProxyMetrics(Collector):
    """The proxy's metrics, on a registry of its own: the counts and histograms below, and the
    instances' state read from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.requests = Counter("pdproxy_requests", "Client requests by route and status.", ["route", "status"])
        self.errors = Counter("pdproxy_errors", "Failures by kind.", ["kind"])
        self.ejections = Counter(
            "pdproxy_ejections", "Instances taken out of rotation, by role and reason (an exchange's outcome: "
            "conn_error, 5xx, timeout, models; or a probe's: probe_unreachable, probe_status, probe_no_answer).",
            ["role", "reason"],
        )
        self.upstream = Counter(
            "pdproxy_upstream_requests", "Upstream requests by instance and outcome.", ["role", "instance", "outcome"])
        self.ttft = Histogram("pdproxy_time_to_first_token_seconds", "Time to the first byte sent to the client.",
                              ["route"])
        self.latency = Histogram("pdproxy_request_latency_seconds", "Whole request latency.", ["route"])
        self.instance_latency = Histogram(
            "pdproxy_upstream_latency_seconds", "Upstream request latency per instance.", ["role", "instance"])
        self._counters = (self.requests, self.errors, self.ejections, self.upstream)
        self._histograms = (self.ttft, self.latency, self.instance_latency)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self.registry.register(_InstanceCollector(registry))

    def collect(self) -> Iterator[Metric]:
        for counter in self._counters:
            yield counter.family()
        for hist in self._histograms:
            yield hist.family()
