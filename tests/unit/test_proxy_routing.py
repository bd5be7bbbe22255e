"""`engines_from`: which engines the proxy routes to, from members, statuses and assignments."""

from __future__ import annotations

from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus
from pdsupervisor.proxy.etcd_source import engines_from
from pdsupervisor.proxy.instances import Registry

LEASE = 7


def _facts(node: str = "n1", lease: int = LEASE, ip: str = "10.0.0.1") -> NodeFacts:
    return NodeFacts(name=node, ip=ip, lease=lease)


def _proc(name: str, endpoint: str, state: ProcessState = ProcessState.ready) -> ProcessStatus:
    role = "prefill" if name.startswith("prefill") else "decode"
    return ProcessStatus(name=name, role=role, state=state, endpoint=endpoint)


def _status(*procs: ProcessStatus, node: str = "n1", lease: int = LEASE) -> NodeStatus:
    return NodeStatus(node=node, updated_at=1.0, lease=lease, processes=list(procs))


def _assignment(*engines: tuple[str, str], node: str = "n1") -> NodeAssignment:
    """`(name, host:port)` of each engine assigned to the node."""
    specs = [ProcessSpec(name=name, role="prefill" if name.startswith("prefill") else "decode", argv=["x"],
                         host=ep.rpartition(":")[0], port=int(ep.rpartition(":")[2])) for name, ep in engines]
    return NodeAssignment(node=node, processes=specs)


PRE, DEC = "10.0.0.1:8100", "10.0.0.1:8200"
BOTH = (("prefill-0", PRE), ("decode-0", DEC))


def test_a_current_status_routes_its_ready_engines_whatever_the_assignment_says():
    status = _status(_proc("prefill-0", PRE), _proc("decode-0", DEC))
    assert engines_from({"n1": status}, {"n1": _facts()}, {}) == {"prefill": {PRE: "agent"}, "decode": {DEC: "agent"}}


def test_a_current_status_saying_not_ready_or_leaving_the_engine_out_removes_it():
    for state in (ProcessState.starting, ProcessState.running, ProcessState.stopping, ProcessState.failed):
        status = _status(_proc("prefill-0", PRE), _proc("decode-0", DEC, state))
        routed = engines_from({"n1": status}, {"n1": _facts()}, {"n1": _assignment(*BOTH)})
        assert routed == {"prefill": {PRE: "agent"}, "decode": {}}, state
    # no longer listed by its current agent, though still assigned: out
    routed = engines_from({"n1": _status(_proc("prefill-0", PRE))}, {"n1": _facts()}, {"n1": _assignment(*BOTH)})
    assert routed == {"prefill": {PRE: "agent"}, "decode": {}}


def test_an_agent_away_keeps_the_last_ready_engines_its_assignment_still_holds():
    status = _status(_proc("prefill-0", PRE), _proc("decode-0", DEC))
    away = {"prefill": {PRE: "last-known"}, "decode": {DEC: "last-known"}}
    # member key gone (agent killed, lease lapsed)
    assert engines_from({"n1": status}, {}, {"n1": _assignment(*BOTH)}) == away
    # re-registered under a new lease, not reported yet (an agent restarting, adopting its engines)
    assert engines_from({"n1": status}, {"n1": _facts(lease=LEASE + 1)}, {"n1": _assignment(*BOTH)}) == away


def test_an_agent_away_routes_only_what_its_last_status_said_was_ready():
    status = _status(_proc("prefill-0", PRE), _proc("decode-0", DEC, ProcessState.backoff))
    assert engines_from({"n1": status}, {}, {"n1": _assignment(*BOTH)}) == {"prefill": {PRE: "last-known"}, "decode": {}}


def test_an_agent_away_routes_nothing_the_coordinator_planned_away():
    status = _status(_proc("prefill-0", PRE), _proc("decode-0", DEC))
    # the node has no assignment at all: cluster stopped, or the node planned away
    assert engines_from({"n1": status}, {}, {}) == {"prefill": {}, "decode": {}}
    # the decode is no longer assigned; assigned elsewhere on the node (another port); renamed
    for decode in ((), (("decode-0", "10.0.0.1:8201"),), (("decode-1", DEC),)):
        routed = engines_from({"n1": status}, {}, {"n1": _assignment(("prefill-0", PRE), *decode)})
        assert routed == {"prefill": {PRE: "last-known"}, "decode": {}}, decode


def test_a_wildcard_bind_is_reached_through_the_node_address_when_it_is_known():
    status = _status(_proc("decode-0", "0.0.0.0:8200"))
    assignment = _assignment(("decode-0", "0.0.0.0:8200"))
    assert engines_from({"n1": status}, {"n1": _facts()}, {}) == {"prefill": {}, "decode": {DEC: "agent"}}
    assert engines_from({"n1": status}, {"n1": _facts(lease=9)}, {"n1": assignment})["decode"] == {DEC: "last-known"}
    assert engines_from({"n1": status}, {}, {"n1": assignment})["decode"] == {}  # no member key: no address


def test_nodes_are_read_in_order_each_by_its_own_rule():
    statuses = {"n2": _status(_proc("decode-0", "10.0.0.2:8200"), node="n2", lease=3),
                "n1": _status(_proc("decode-0", DEC)),
                "n3": _status(_proc("decode-0", "10.0.0.3:8200"), node="n3", lease=4)}
    members = {"n1": _facts(), "n3": _facts("n3", lease=5, ip="10.0.0.3")}
    assignments = {"n2": _assignment(("decode-0", "10.0.0.2:8200"), node="n2")}  # n3: none
    assert list(engines_from(statuses, members, assignments)["decode"].items()) == [
        (DEC, "agent"), ("10.0.0.2:8200", "last-known")]


def test_set_endpoints_updates_the_source_and_keeps_the_instance():
    registry = Registry()
    registry.set_endpoints("decode", [DEC])
    inst = registry.instances("decode")[0]
    assert inst.source == "static" and inst.view()["source"] == "static"
    registry.eject(inst, "probe: refused")
    registry.set_endpoints("decode", {DEC: "last-known"})
    assert registry.instances("decode") == [inst] and inst.source == "last-known" and inst.ejected
    registry.set_endpoints("decode", {})
    assert not registry.holds(inst)
