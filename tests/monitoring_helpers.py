"""What etc/prometheus/alerts.yml and etc/grafana/pdsupervisor.json ask of Prometheus: their
expressions, the metric names those select, and the names an exposition offers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "etc" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "pdsupervisor.json"

# PromQL words that look like names (label lists after `by`, `on`, ... are removed first)
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "Inf", "NaN"}
# Grafana's variables, given values Prometheus can parse
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$node": ".*"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords nor labels)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names


def sample_names(text: str) -> set[str]:
    """Every sample name an exposition can have, from its families, empty ones included."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created", "")}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    return [p for top in d["panels"] for p in (top, *top.get("panels", ()))]


def dashboard_exprs(d: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p.get("targets", ())]


def template_metrics(d: dict[str, Any]) -> set[str]:
    """Metrics the dashboard's variables read (`label_values(metric, label)`)."""
    names = set()
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            names |= set(re.findall(r"label_values\(\s*([\w:]+)", var["definition"]))
    return names


def used_metrics() -> dict[str, set[str]]:
    """Metric names by where they are used: each alert, each panel, the dashboard's variables."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        used.setdefault(f"alert {rule['alert']}", set()).update(metric_names(rule["expr"]))
    d = dashboard()
    for p in panels(d):
        for t in p.get("targets", ()):
            used.setdefault(f"panel {p['title']}", set()).update(metric_names(t["expr"]))
    used["dashboard variables"] = template_metrics(d)
    return used
