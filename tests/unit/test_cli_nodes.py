"""`pdsupervisor nodes`: the members' facts with their roles, from GET /nodes and GET /cluster
(answered here by the real cluster view; against a real agent: tests/component/test_api.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from pdsupervisor.cli.main import main
from pdsupervisor.cli.nodes import age
from pdsupervisor.core.cluster_view import Observed, SpecRecord, cluster_document
from pdsupervisor.core.documents import ClusterDocument, NodesDocument, nodes_document
from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.spec import validate_spec

ROOT = Path(__file__).resolve().parents[2]


def members(now: float) -> dict[str, NodeFacts]:
    return {f"node{i}": NodeFacts(name=f"node{i}", ip=f"127.0.0.{i}", lease=i, accelerators=8, agent_version="0.9.1",
                                  api_url=f"http://127.0.0.{i}:8470", registered_at=now - 60 * i)
            for i in (1, 2, 3, 4)}


class FakeClient:
    """The demo spec submitted on node1..node4 (node4 is spare); node1 coordinates."""

    def __init__(self, now: float) -> None:
        spec = validate_spec(yaml.safe_load((ROOT / "etc/pdsupervisor/demo.yaml").read_text()))
        self.members = members(now)
        self.obs = Observed(record=SpecRecord(generation=1, spec=spec.model_dump(mode="json")), members=self.members,
                            assignments={}, statuses={}, leader="node1")
        self.now = now

    async def nodes(self) -> NodesDocument:
        return nodes_document(self.members, "node1")

    async def cluster(self) -> ClusterDocument:
        return cluster_document(self.obs, self.now)


def _invoke(monkeypatch, *args: str):
    client = FakeClient(time.time())
    monkeypatch.setattr("pdsupervisor.cli.nodes.make_client", lambda *a: client)
    return CliRunner().invoke(main, ["nodes", *args], catch_exceptions=False)


def test_a_row_per_node_with_facts_lease_age_and_roles(monkeypatch):
    result = _invoke(monkeypatch)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert set(rows) == {"node1", "node2", "node3", "node4"}
    assert "(coordinator)" in rows["node1"] and "(coordinator)" not in rows["node2"]
    for cell in ("127.0.0.1", "8", "0.9.1", "http://127.0.0.1:8470", "1m00s", "mooncake-master, prefill, proxy"):
        assert cell in rows["node1"], (cell, rows["node1"])
    assert rows["node3"].rstrip().endswith("decode") and "3m00s" in rows["node3"]
    assert rows["node4"].rstrip().endswith("spare")


def test_json_is_each_members_facts_with_roles_and_lease_age(monkeypatch):
    result = _invoke(monkeypatch, "-o", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["leader"] == "node1"
    node2 = next(n for n in report["nodes"] if n["name"] == "node2")
    assert node2["roles"] == ["decode"] and 119 <= node2["lease_age_s"] <= 125
    assert node2["api_url"] == "http://127.0.0.2:8470" and node2["agent_version"] == "0.9.1"
    assert NodeFacts.model_validate({k: v for k, v in node2.items() if k not in ("roles", "lease_age_s")})


def test_ages_read_at_a_glance():
    assert [age(s) for s in (5, 65, 3700, 90000)] == ["0m05s", "1m05s", "1h01m", "1d01h"]
