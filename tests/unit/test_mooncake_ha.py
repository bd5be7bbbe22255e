"""Mooncake master HA (`mooncake.replicas` >= 2): the spec's checks, the plan, the coordinator's view."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

from pdsupervisor.cli.main import main
from pdsupervisor.core.cluster_view import Observed, SpecRecord, desired_state
from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.planner import PlanError, plan_cluster, port_claims
from pdsupervisor.core.spec import SpecError, load_spec, validate_spec
from pdsupervisor.core.trial_checks import submit_problems
from tests.unit.test_planner import EXAMPLE, example_doc, seed_nodes
from tests.view_helpers import ROOT, engines, settle

HA_ETCD = ["10.239.129.50:2479", "10.239.129.51:2479"]


def ha_doc(**mooncake) -> dict:
    doc = example_doc()
    doc["mooncake"].update({"replicas": 2, "ha_etcd": HA_ETCD, **mooncake})
    return doc


def problems(doc: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        validate_spec(doc)
    return err.value.problems


def test_one_replica_plans_exactly_as_before():
    """No new field in the default spec's processes: every hash stays as it was."""
    spec = load_spec(EXAMPLE.read_text())
    assert spec.mooncake.replicas == 1
    plan = plan_cluster(spec, seed_nodes())
    (master,) = [p for _, p in plan.masters()]
    assert master.readiness.kind == "tcp" and "-enable_ha=true" not in master.argv
    assert plan.master_nodes == ["g10"] and plan.master_address == "10.239.129.9:50001"
    assert all("MC_STORE_CLUSTER_ID" not in p.env for _, p in plan.engines())


def test_two_replicas_run_masters_on_distinct_nodes_electing_through_their_own_etcd():
    spec = validate_spec(ha_doc())
    plan = plan_cluster(spec, seed_nodes())
    assert plan.master_nodes == ["g10", "g13"]  # the bootstrap node first, then the engine nodes
    masters = dict(plan.masters())
    assert set(masters) == {"g10", "g13"}
    g13 = masters["g13"]
    tail = g13.argv[g13.argv.index("-enable_ha=true"):]
    assert tail == ["-enable_ha=true", "-ha_backend_type", "etcd", "-etcd_endpoints", ";".join(HA_ETCD),
                    "-cluster_id", "deepseek-r1", "-enable_oplog=false", "-rpc_address", "10.239.129.81",
                    "-metrics_host", "10.239.129.81", "-metrics_port", "9003"]
    # only the leader opens its RPC port: readiness is the admin server's /health, standby too
    assert (g13.readiness.kind, g13.readiness.host, g13.readiness.port, g13.readiness.path) == (
        "http", "10.239.129.81", 9003, "/health")
    assert plan.master_address == "etcd://10.239.129.50:2479;10.239.129.51:2479"
    for _, p in plan.engines():
        assert p.env["MC_STORE_CLUSTER_ID"] == "deepseek-r1"
        cfg = json.loads(p.files[0].content)
        assert cfg["master_server_address"] == plan.master_address
        assert plan.etcd_endpoints[0] not in p.files[0].content  # never the control plane's
    assert (9003, "mooncake.metrics_port") in {(c.port, c.field) for c in port_claims(spec, plan, "g13")}
    assert 9003 not in {c.port for c in port_claims(spec, plan, "g14")}


def test_master_nodes_are_taken_in_order_skipping_unregistered_ones():
    doc = ha_doc(master_nodes=["g14", "gone", "g10"])
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    assert plan.master_nodes == ["g14", "g10"] and plan.master_node == "g14"
    doc["mooncake"]["ha_oplog"] = True
    (g14,) = [p for n, p in plan_cluster(validate_spec(doc), seed_nodes()).masters() if n == "g14"]
    assert "-enable_oplog=true" in g14.argv


def test_too_few_nodes_is_a_plan_error_naming_replicas():
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(ha_doc(replicas=4)), seed_nodes())
    assert err.value.problems == [("mooncake.replicas", "4 masters need 4 distinct registered nodes; "
                                                        "found 3: g10, g13, g14")]
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(ha_doc(master_nodes=["g10", "gone"])), seed_nodes())
    assert err.value.problems == [("mooncake.replicas", "2 masters need 2 distinct registered nodes among "
                                                        "mooncake.master_nodes; found 1: g10")]


def test_a_node_joining_can_fix_too_few_masters_so_submit_accepts_it():
    """4 masters on a 3-node layout: pending until a fourth node registers, not refused."""
    assert submit_problems(validate_spec(ha_doc(replicas=4))) == []


def test_the_ha_etcd_must_not_be_the_control_plane_etcd():
    doc = ha_doc(ha_etcd=["10.239.129.50:2479", "10.239.129.9:2379"])  # the second is etcd.bootstrap_node's
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(doc), seed_nodes())
    assert [f for f, _ in err.value.problems] == ["mooncake.ha_etcd"]
    assert "10.239.129.9:2379 is the control-plane etcd" in err.value.problems[0][1]
    doc["etcd"] = {"endpoints": ["https://10.239.129.9:2379"]}  # an explicit scheme: the same endpoint
    assert ("mooncake.ha_etcd" in {f for f, _ in submit_problems(validate_spec(doc))})


@pytest.mark.parametrize("ha_etcd", [["127.0.0.1:2379"], ["LOCALHOST:2379"], ["0.0.0.0:2379"]])
def test_the_ha_etcd_must_not_reach_the_control_plane_etcd_by_another_name(ha_etcd):
    """A master on the bootstrap node (its agent's member listens on 127.0.0.1 too) would elect
    through the control-plane etcd under a loopback name; host names compare without case."""
    doc = ha_doc(ha_etcd=["10.239.129.50:2479", *ha_etcd])
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(doc), seed_nodes())
    assert [f for f, _ in err.value.problems] == ["mooncake.ha_etcd"]
    assert f"{ha_etcd[0]} is the control-plane etcd" in err.value.problems[0][1]


def test_the_ha_etcd_must_not_be_another_members_etcd():
    """Agents may run etcd members the spec does not list (`bootstrap_etcd.members`): any
    registered node at the control-plane client port is refused too."""
    nodes = seed_nodes()
    other = next(f for n, f in nodes.items() if n != validate_spec(ha_doc()).etcd.bootstrap_node)
    doc = ha_doc(ha_etcd=["10.239.129.50:2479", f"{other.ip}:2379"])
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(doc), nodes)
    assert [f for f, _ in err.value.problems] == ["mooncake.ha_etcd"]
    assert f"{other.ip}:2379 is the control-plane etcd" in err.value.problems[0][1]


def test_the_ha_etcd_host_names_compare_without_case():
    doc = ha_doc(ha_etcd=["10.239.129.50:2479", "etcd1.example:2379"])
    doc["etcd"] = {"endpoints": ["https://Etcd1.Example:2379"]}
    assert "mooncake.ha_etcd" in {f for f, _ in submit_problems(validate_spec(doc))}


def test_mooncake_disabled_needs_no_nodes_for_its_replicas():
    """`enabled: false` with the HA settings kept: no master runs, so the count asks for no node."""
    nodes = seed_nodes()
    doc = ha_doc(enabled=False)
    doc["mooncake"]["replicas"] = len(nodes) + 1
    plan = plan_cluster(validate_spec(doc), nodes)
    assert plan.masters() == [] and len(plan.master_nodes) <= 1


def test_a_loopback_ha_etcd_on_another_port_is_its_own():
    plan_cluster(validate_spec(ha_doc(ha_etcd=["127.0.0.1:2479"])), seed_nodes())


@pytest.mark.parametrize("mooncake, field, says", [
    ({"ha_etcd": []}, "mooncake.ha_etcd", "give its host:port endpoints"),
    ({"ha_etcd": ["http://10.0.0.1:2479"]}, "mooncake.ha_etcd", "give host:port"),
    ({"metadata": "master-http"}, "mooncake.metadata", "lost with it"),
    ({"metrics_port": 50001}, "mooncake.metrics_port", "same as mooncake.port"),
    ({"extra_args": ["--v=1", "-metrics_port=19003", "--etcd_endpoints", "x:1"]}, "mooncake.extra_args",
     "-etcd_endpoints, -metrics_port: set by the planner"),
    ({"master_nodes": ["g10"]}, "mooncake.master_nodes", "lists 1 nodes for 2 replicas"),
    ({"master_nodes": ["g10", "g10", "g13"]}, "mooncake.master_nodes", "listed twice"),
    ({"master_nodes": ["g10", "g13"], "master_node": "g10"}, "mooncake.master_nodes", "not both"),
    ({"replicas": 0}, "mooncake.replicas", "greater than or equal to 1"),
    ({"replicas": 10}, "mooncake.replicas", "less than or equal to 9"),
])
def test_bad_ha_input_names_the_field(mooncake, field, says):
    found = problems(ha_doc(**mooncake))
    assert any(f == field and says in why for f, why in found), found


def test_the_plan_command_shows_the_ha_set(tmp_path):
    path = tmp_path / "ha.yaml"
    path.write_text(yaml.safe_dump(ha_doc()))
    nodes = ["--node", "g10=10.0.0.9", "--node", "g13=10.0.0.81", "--node", "g14=10.0.0.165"]
    out = CliRunner().invoke(main, ["plan", "-f", str(path), *nodes], terminal_width=400)
    assert out.exit_code == 0, out.output
    assert "master etcd://10.239.129.50:2479;10.239.129.51:2479 (HA: g10, g13)" in out.output


def test_one_replica_keeps_extra_args_as_they_are():
    doc = example_doc()
    doc["mooncake"]["extra_args"] = ["-metrics_port", "19003"]
    assert validate_spec(doc).mooncake.extra_args == ["-metrics_port", "19003"]


# ---- the coordinator: a master dying no longer restarts the engines --------------------------

def _ha_running(master_pid: int) -> Observed:
    spec = yaml.safe_load((ROOT / "etc/pdsupervisor/demo.yaml").read_text())
    spec["mooncake"].update(replicas=2, ha_etcd=["127.0.0.1:2479"], extra_args=[])
    members = {f"node{i}": NodeFacts(name=f"node{i}", ip=f"127.0.0.{i}", lease=i, state_dir=f"/tmp/n{i}")
               for i in (1, 2, 3)}
    obs = Observed(record=SpecRecord(generation=1, spec=validate_spec(spec).model_dump(mode="json")),
                   members=members, assignments={}, statuses={})
    return settle(obs, {"mooncake-master": master_pid})[0]


def test_an_ha_master_crash_keeps_every_engine_running():
    obs = _ha_running(master_pid=500)
    assert sorted(n for n, a in obs.assignments.items() for p in a.processes if p.role == "mooncake-master") == [
        "node1", "node2"]
    before = engines(obs.assignments)
    assert len(before) == 6
    obs, history = settle(obs, {"mooncake-master": 501})  # both masters now report a new pid
    assert obs.record.master_epoch == 0
    assert all(h == before for h in history)


def test_while_an_ha_master_is_down_the_engines_keep_what_they_run():
    obs = _ha_running(master_pid=500)
    before = engines(obs.assignments)
    node2 = obs.statuses["node2"]
    down = node2.model_copy(update={"processes": [
        p.model_copy(update={"state": "backoff", "pid": None}) if p.role == "mooncake-master" else p
        for p in node2.processes]})
    desired = desired_state(dataclasses.replace(obs, statuses={**obs.statuses, "node2": down}))
    assert engines(desired.assignments) == before and desired.record.master_epoch == 0
    assert [p.name for p in desired.assignments["node2"].processes if p.role == "mooncake-master"] == [
        "mooncake-master"]  # still assigned: its agent restarts it
