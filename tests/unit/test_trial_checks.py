"""Submit-time checks on the trial plan: what no registration can fix is refused, what a node
joining can fix is left to the planner (the cluster stays `pending`, `missing` says why)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.planner import PlanError, plan_cluster
from pdsupervisor.core.spec import SpecError, load_spec, validate_spec
from pdsupervisor.core.trial_checks import submit_problems

EXAMPLE = Path(__file__).resolve().parents[2] / "etc/pdsupervisor/cluster.example.yaml"


def doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())  # prefill g10, decode g13 g14 (8 engines each), etcd on g10


def counted(d: dict) -> dict:
    """The roles by count instead of by name."""
    for role in ("prefill", "decode"):
        d[role]["nodes"] = len(d[role].pop("node_names"))
    return d


@pytest.mark.parametrize(
    "mutate, field, why",
    [
        # the proxy and the master sit on the first prefill node unless the spec names theirs
        (lambda d: d["proxy"].update(port=8100), "proxy.port", "port 8100 on node g10 is also prefill.base_port"),
        (lambda d: d["mooncake"].update(port=8100), "prefill.base_port", "port 8100 on node g10 is also mooncake.port"),
        (lambda d: d["proxy"].update(port=50001), "proxy.port", "port 50001 on node g10 is also mooncake.port"),
        # etcd's ports on its bootstrap node, the DP rendezvous on the first decode node
        (lambda d: d["etcd"].update(peer_port=8868), "etcd.peer_port", "port 8868 on node g10 is also proxy.port"),
        (lambda d: d["decode"].update(dp_master_port=8207), "decode.dp_master_port",
         "port 8207 on node g13 is also decode.base_port"),
        (lambda d: d["mooncake"].update(metadata="master-http", metadata_port=8868), "mooncake.metadata_port",
         "port 8868 on node g10 is also proxy.port"),
        # a node the spec names for two things holds both
        (lambda d: d["proxy"].update(node="g14", port=8200), "proxy.port", "port 8200 on node g14 is also decode.base_port"),
        # count-based roles: the clash is on whichever node registers first for the role
        (lambda d: counted(d)["proxy"].update(port=8100), "proxy.port",
         "port 8100 on prefill node #1 is also prefill.base_port"),
        # not placeable on any members: Mooncake's metadata in the control-plane etcd named in the spec
        (lambda d: d.update(etcd={"endpoints": ["10.0.0.9:2379"]}) or d["mooncake"].update(metadata="etcd://10.0.0.9:2379"),
         "mooncake.metadata", "10.0.0.9:2379 is the control-plane etcd"),
    ],
)
def test_what_no_registration_can_fix_is_refused_on_submit(mutate, field, why):
    d = doc()
    mutate(d)
    spec = validate_spec(d)  # each field is valid on its own
    assert any(f == field and why in w for f, w in submit_problems(spec)), submit_problems(spec)
    with pytest.raises(SpecError) as err:
        load_spec(yaml.safe_dump(d))
    assert any(f == field and why in w for f, w in err.value.problems)


def test_a_clash_that_depends_on_placement_is_left_to_the_planner():
    d = counted(doc())
    d["etcd"] = {"endpoints": ["10.0.0.9:2379"]}
    d["mooncake"].update(master_node="g99", port=8100)  # clashes only if the prefill engine lands on g99
    spec = load_spec(yaml.safe_dump(d))
    assert submit_problems(spec) == []
    plan_cluster(spec, _members("a1", "g99", "h1", "h2"))  # prefill on a1: no clash
    with pytest.raises(PlanError, match="port 8100 on node g99 is also"):  # prefill on g99, by name order
        plan_cluster(spec, _members("g99", "h1", "h2"))


def _members(*names: str) -> dict[str, NodeFacts]:
    return {n: NodeFacts(name=n, ip=f"10.0.0.{i + 1}") for i, n in enumerate(names)}


def test_what_a_node_joining_can_fix_is_accepted():
    for d in (doc(), counted(doc())):
        spec = load_spec(yaml.safe_dump(d))  # no member registered at all: nothing is refused
        assert submit_problems(spec) == []
