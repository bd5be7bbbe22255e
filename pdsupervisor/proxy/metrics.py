"""Prometheus metrics of the proxy (see `ProxyMetrics`)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pdsupervisor.proxy.instances import ROLES, Registry

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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


Snapshot = dict[str, Any]  # what `ProxyMetrics.snapshot` gives: JSON, for the other workers


class ProxyMetrics(Collector):
    """The proxy's metrics, on a registry of its own (several proxies per test process): the
    counts and histograms below, and the instances' state read from the registry at scrape time:
    in-flight and ejection per instance, instances in rotation per role (0 too: an alert on a role
    left without instances needs the sample) and how many of those are routed on the last status
    of an agent that is away; under `--policy prefix`, how prefills were routed.

    With `--workers N`, each worker has its own; `peers` (set by `workers`) gives the other
    workers' latest snapshots, so that a scrape, whichever worker answers it, gives the whole
    proxy's: counts and histograms summed, in-flight summed, an instance ejected if any worker
    ejected it, a role's instances in rotation the fewest any worker has."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
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
        self.peers: Callable[[], list[Snapshot]] = list
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def snapshot(self) -> Snapshot:
        """This process's counts and instance state, as JSON values."""
        instances = self._registry.instances()
        return {
            "counters": {c.name: [[list(k), v] for k, v in c.values.items()] for c in self._counters},
            "histograms": {h.name: [[list(k), v] for k, v in h.series.items()] for h in self._histograms},
            "instances": [[i.role, i.endpoint, i.inflight, 1 if i.ejected else 0] for i in instances],
            "roles": {role: [sum(1 for i in instances if i.role == role and not i.ejected),
                             sum(1 for i in instances if i.role == role and not i.ejected and i.source == "last-known")]
                      for role in ROLES},
        }

    def resume(self, snap: Snapshot) -> None:
        """Go on counting from an earlier snapshot (a worker restarted in its predecessor's place)."""
        for c in self._counters:
            c.values.update((tuple(k), float(v)) for k, v in snap.get("counters", {}).get(c.name, []))
        for h in self._histograms:
            h.series.update((tuple(k), [float(x) for x in v]) for k, v in snap.get("histograms", {}).get(h.name, []))

    def collect(self) -> Iterator[Metric]:
        snaps = [self.snapshot(), *self.peers()]
        for c in self._counters:
            total = Counter(c.name, c.doc, c.labels)
            for snap in snaps:
                for k, v in snap["counters"].get(c.name, []):
                    key = tuple(k)
                    total.values[key] = total.values.get(key, 0.0) + v
            yield total.family()
        for h in self._histograms:
            merged = Histogram(h.name, h.doc, h.labels, h.buckets)
            for snap in snaps:
                for k, v in snap["histograms"].get(h.name, []):
                    key = tuple(k)
                    have = merged.series.get(key)
                    merged.series[key] = v if have is None else [a + b for a, b in zip(have, v, strict=True)]
            yield merged.family()
        yield from _instance_families(snaps)
        if self._registry.policy == "prefix":  # this worker's: each keeps its own prefix map
            routed = CounterMetricFamily("pdproxy_prefix_routed", "Prefills routed by --policy prefix: to the instance "
                                         "holding the longest prefix (hit), by load as it was too busy (busy) or as "
                                         "none held one (miss).", labels=["outcome"])
            for outcome, n in self._registry.prefix_routed.items():
                routed.add_metric([outcome], n)
            yield routed


def _instance_families(snaps: list[Snapshot]) -> Iterator[Metric]:
    inflight = GaugeMetricFamily("pdproxy_instance_inflight", "Requests in flight per instance.", labels=["role", "instance"])
    ejected = GaugeMetricFamily("pdproxy_instance_ejected", "1 if the instance is ejected.", labels=["role", "instance"])
    available = GaugeMetricFamily("pdproxy_available_instances", "Instances of the role in rotation "
                                  "(not ejected).", labels=["role"])
    last_known = GaugeMetricFamily("pdproxy_last_known_instances", "Instances of the role in rotation whose "
                                   "node's agent is away (routed on its last status).", labels=["role"])
    per_instance: dict[tuple[str, str], list[int]] = {}
    for snap in snaps:
        for role, endpoint, n, out in snap["instances"]:
            have = per_instance.setdefault((role, endpoint), [0, 0])
            have[0] += n
            have[1] = max(have[1], out)
    for (role, endpoint), (n, out) in per_instance.items():
        inflight.add_metric([role, endpoint], n)
        ejected.add_metric([role, endpoint], out)
    for role in ROLES:
        available.add_metric([role], min(snap["roles"][role][0] for snap in snaps))
        last_known.add_metric([role], max(snap["roles"][role][1] for snap in snaps))
    yield inflight
    yield ejected
    yield available
    yield last_known
