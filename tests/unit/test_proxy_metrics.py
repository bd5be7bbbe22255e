"""The proxy's metrics: plain counters and histograms exposed as prometheus-client's were, and,
with workers, every worker's figures merged in whichever worker is scraped."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdsupervisor.proxy.instances import Registry
from pdsupervisor.proxy.metrics import ProxyMetrics


def _samples(metrics: ProxyMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _worker(ejected: bool = False) -> tuple[ProxyMetrics, Registry]:
    registry = Registry()
    registry.set_endpoints("prefill", ["p:1"])
    registry.set_endpoints("decode", ["d:1", "d:2"])
    if ejected:
        registry.eject(registry.instances("decode")[0], "test")
    return ProxyMetrics(registry), registry


def test_counts_and_buckets_read_as_before():
    m, _ = _worker()
    m.requests.inc("/v1/completions", "200")
    m.requests.inc("/v1/completions", "200")
    for value in (0.001, 0.003, 0.7, 1000):
        m.latency.observe(value, "/v1/completions")
    s = _samples(m)
    route = (("route", "/v1/completions"),)
    assert s["pdproxy_requests_total", (("route", "/v1/completions"), ("status", "200"))] == 2
    assert s["pdproxy_request_latency_seconds_bucket", (("le", "0.001"), *route)] == 1  # le: at most
    assert s["pdproxy_request_latency_seconds_bucket", (("le", "0.005"), *route)] == 2
    assert s["pdproxy_request_latency_seconds_bucket", (("le", "1.0"), *route)] == 3
    assert s["pdproxy_request_latency_seconds_bucket", (("le", "+Inf"), *route)] == 4
    assert s["pdproxy_request_latency_seconds_count", route] == 4
    assert abs(s["pdproxy_request_latency_seconds_sum", route] - 1000.704) < 1e-9


def test_a_scrape_merges_the_other_workers_snapshots():
    a, reg_a = _worker()
    b, reg_b = _worker(ejected=True)
    a.requests.inc("/v1/completions", "200")
    b.requests.inc("/v1/completions", "200")
    b.requests.inc("/v1/completions", "503")
    a.latency.observe(0.002, "/v1/completions")
    b.latency.observe(0.002, "/v1/completions")
    reg_a.acquire(reg_a.instances("decode")[1], 10)
    reg_b.acquire(reg_b.instances("decode")[1], 10)
    a.peers = lambda: [json.loads(json.dumps(b.snapshot()))]  # as the files carry it
    s = _samples(a)
    assert s["pdproxy_requests_total", (("route", "/v1/completions"), ("status", "200"))] == 2
    assert s["pdproxy_requests_total", (("route", "/v1/completions"), ("status", "503"))] == 1
    assert s["pdproxy_request_latency_seconds_count", (("route", "/v1/completions"),)] == 2
    assert s["pdproxy_instance_inflight", (("instance", "d:2"), ("role", "decode"))] == 2  # summed
    assert s["pdproxy_instance_ejected", (("instance", "d:1"), ("role", "decode"))] == 1  # by any worker
    assert s["pdproxy_available_instances", (("role", "decode"),)] == 1  # the fewest any worker has
    assert s["pdproxy_available_instances", (("role", "prefill"),)] == 1


def test_a_restarted_worker_goes_on_from_its_predecessors_counts():
    old, _ = _worker()
    old.requests.inc("/v1/completions", "200")
    old.ttft.observe(0.01, "/v1/completions")
    new, _ = _worker()
    new.resume(json.loads(json.dumps(old.snapshot())))
    new.requests.inc("/v1/completions", "200")
    new.ttft.observe(0.01, "/v1/completions")
    s = _samples(new)
    assert s["pdproxy_requests_total", (("route", "/v1/completions"), ("status", "200"))] == 2
    assert s["pdproxy_time_to_first_token_seconds_count", (("route", "/v1/completions"),)] == 2
