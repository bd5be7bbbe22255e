"""What operators load into Prometheus and Grafana names only metrics that exist: every metric
in etc/prometheus/alerts.yml and etc/grafana/pdsupervisor.json is one an agent's /metrics or
the proxy's registry exports; the dashboard is Grafana-shaped; README lists each agent metric.
(promtool runs on both in tests/component/test_monitoring_promtool.py.)"""

from __future__ import annotations

import re

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig, RestConfig
from agent.daemon import Agent
from pdsupervisor.proxy.instances import Registry
from pdsupervisor.proxy.metrics import ProxyMetrics
from tests.monitoring_helpers import ROOT, alert_rules, dashboard, metric_names, panels, sample_names, used_metrics


@pytest.fixture
def agent_metrics(tmp_path) -> str:
    """A test agent's exposition: what its GET /metrics answers (a live agent's is read in
    tests/component/test_agent_metrics.py)."""
    cfg = AgentConfig(name="n1", ip="127.0.0.1", state_dir=str(tmp_path / "state"), rest=RestConfig(port=0),
                      etcd=["127.0.0.1:1"], sys_root=str(tmp_path))
    return Agent(cfg).metrics.exposition().decode()


@pytest.fixture
def exported(agent_metrics) -> set[str]:
    agent = sample_names(agent_metrics)
    proxy = sample_names(generate_latest(ProxyMetrics(Registry()).registry).decode())
    assert "pdsupervisor_process_restarts_total" in agent and "pdproxy_time_to_first_token_seconds_bucket" in proxy
    return agent | proxy


def test_metric_names_finds_selectors_only():
    expr = ('histogram_quantile(0.99, sum by (node, le) (rate(a_bucket{node=~"$node", x="sum(b)"}[$__rate_interval])))'
            " > 0.5 or on (instance) group_left (node) c_total * 1e3 unless absent(d) offset 5m")
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}


def test_every_metric_used_is_exported(exported):
    used = used_metrics()
    unknown = {where: sorted(names - exported) for where, names in used.items() if names - exported}
    assert not unknown, f"metrics nobody exports: {unknown}"
    assert {"pdsupervisor_cluster_phase", "pdsupervisor_process_state", "pdsupervisor_process_restarts_total",
            "pdsupervisor_coordinator_is_leader", "pdproxy_time_to_first_token_seconds_bucket",
            "pdproxy_requests_total"} <= set().union(*used.values())


def test_alerts_cover_what_operators_asked_for():
    names = {rule["alert"] for rule in alert_rules()}
    assert {"PdProcessCrashLooping", "PdNodeLost", "PdNoCoordinator", "PdProxyWithoutInstances",
            "PdEtcdUnreachable"} <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


def test_dashboard_is_grafana_shaped():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "node"]
    ps = panels(d)
    assert len({p["id"] for p in ps}) == len(ps)
    cells: set[tuple[int, int]] = set()
    for p in ps:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " ".join(p["title"] for p in ps).lower()
    for topic in ("phase", "state", "restarts", "leader", "etcd", "first token", "requests"):
        assert topic in titles


def test_readme_lists_each_agent_metric(agent_metrics):
    # each family as a person writes it: a counter with its `_total`, no `_created` beside it
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(agent_metrics)
                if f.name.startswith("pdsupervisor_") and not f.name.endswith("_created")}
    assert set(re.findall(r"`(pdsupervisor_\w+)`", (ROOT / "README.md").read_text())) == exported
