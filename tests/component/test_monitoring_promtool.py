"""promtool on what operators load: etc/prometheus/alerts.yml passes `promtool check rules` and
fires as tests/prometheus/alerts_test.yml expects (`promtool test rules`); every query of the
dashboard etc/grafana/pdsupervisor.json parses.

promtool comes with Debian's `prometheus` package (.ci/run installs it): missing in CI is a
failure, elsewhere a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.monitoring_helpers import ALERT_TESTS, ALERTS, GRAFANA_VARS, ROOT, alert_rules, dashboard, dashboard_exprs


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_alert_rules_pass_promtool():
    assert "SUCCESS" in run_promtool("check", "rules", str(ALERTS))


def test_each_alert_fires_when_expected_and_not_before():
    run_promtool("test", "rules", str(ALERT_TESTS))
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", ()) if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules()}  # every alert seen firing


def test_dashboard_queries_parse(tmp_path):
    exprs = dashboard_exprs(dashboard())
    for var, value in GRAFANA_VARS.items():
        exprs = [e.replace(var, value) for e in exprs]
    assert exprs and not [e for e in exprs if "$" in e], "a Grafana variable without a stand-in value"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    run_promtool("check", "rules", str(tmp_path / "dashboard.yml"))
