"""`pdsupervisor demo --etcd-members 3`: every agent a member, the spec's endpoints all three."""

from __future__ import annotations

import yaml
from rich.console import Console

from pdsupervisor.cli.demo import REPO_DEMO_SPEC, _demo_spec
from pdsupervisor.local.cluster import LocalCluster


def test_three_members_are_every_agents_endpoints_and_the_specs(tmp_path):
    doc = yaml.safe_load(REPO_DEMO_SPEC.read_text())
    doc["mooncake"]["enabled"] = False  # no master to try here
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec, text = _demo_spec(path, Console(file=None), 3)
    assert spec.etcd.endpoints == ["127.0.0.1:2379", "127.0.0.2:2379", "127.0.0.3:2379"]
    assert yaml.safe_load(text)["etcd"]["endpoints"] == spec.etcd.endpoints
    assert _demo_spec(path, Console(file=None), 1)[0].etcd.endpoints == []  # one member: as the file says

    lc = LocalCluster(cluster="c", root=tmp_path, etcd_members=3, tls=True)
    for agent in lc.agents:
        boot = lc.config(agent)["bootstrap_etcd"]
        assert boot["members"] == {"node1": "127.0.0.1", "node2": "127.0.0.2", "node3": "127.0.0.3"}
        assert boot["cert_file"].endswith(f"{agent.name}/server.crt")
        assert "--etcd" not in lc.argv(agent) and "--bootstrap-etcd" not in lc.argv(agent)
    assert lc.etcd_endpoints == ["https://127.0.0.1:2379", "https://127.0.0.2:2379", "https://127.0.0.3:2379"]
    one = LocalCluster(cluster="c", root=tmp_path)
    assert "bootstrap_etcd" not in one.config(one.agents[0]) and "--bootstrap-etcd" in one.argv(one.agents[0])
