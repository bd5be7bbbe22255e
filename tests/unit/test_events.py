"""The coordinator's events as a pure function of what it saw: two observations, or a write."""

from __future__ import annotations

import dataclasses

from pdsupervisor.core.cluster_view import Desired, Observed, SpecRecord
from pdsupervisor.core.events import ClusterEvent, new_leader, observed_events, write_events
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus

DECODE = ProcessSpec(name="decode-0", role="decode", argv=["x"])


def _member(name: str, lease: int = 7) -> NodeFacts:
    return NodeFacts(name=name, ip="127.0.0.1", lease=lease)


def _obs(members: list[str], assigned: tuple[str, ...] = (), pid: int | None = None, restarts: int = 0,
         exit_code: int | None = None, status_lease: int = 7) -> Observed:
    """Members, nodes assigned decode-0, and n1 reporting decode-0 (when `pid` is given)."""
    statuses = {}
    if pid is not None:
        proc = ProcessStatus(name="decode-0", role="decode", state=ProcessState.ready, pid=pid, restarts=restarts,
                             last_exit_code=exit_code)
        statuses["n1"] = NodeStatus(node="n1", updated_at=1.0, lease=status_lease, processes=[proc])
    return Observed(record=None, members={m: _member(m) for m in members},
                    assignments={n: NodeAssignment(node=n, processes=[DECODE]) for n in assigned}, statuses=statuses)


def test_a_new_leader_reports_only_nodes_with_work_but_no_lease():
    now = _obs(["n1", "n2"], assigned=("n1", "n3", "n4"), pid=100)
    assert observed_events(None, now) == [
        ClusterEvent("member", "n3 lost (lease expired)", {"node": "n3"}),
        ClusterEvent("member", "n4 lost (lease expired)", {"node": "n4"}),
    ]  # no joined members, no started processes: a new leader knows no history


def test_members_joined_and_lost():
    assert observed_events(_obs(["n1", "n2"]), _obs(["n1", "n3"])) == [
        ClusterEvent("member", "n3 joined", {"node": "n3"}),
        ClusterEvent("member", "n2 lost (lease expired)", {"node": "n2"}),
    ]
    assert observed_events(_obs(["n1"]), _obs(["n1"])) == []


def test_a_process_restarted_with_its_exit_code():
    before, after = _obs(["n1"], pid=100, restarts=0), _obs(["n1"], pid=101, restarts=1, exit_code=-9)
    assert observed_events(before, after) == [ClusterEvent(
        "process", "decode-0 on n1 restarted (exit code -9)",
        {"node": "n1", "process": "decode-0", "exit_code": -9, "restarts": 1})]


def test_a_process_started_first_or_anew():
    started = ClusterEvent("process", "decode-0 on n1 started (pid 101)", {"node": "n1", "process": "decode-0", "pid": 101})
    # its first pid (it was reported while still spawning)
    assert observed_events(_spawning(), _obs(["n1"], pid=101)) == [started]
    # a new pid without a restart counted: started again (a new spec, a new assignment)
    assert observed_events(_obs(["n1"], pid=100), _obs(["n1"], pid=101)) == [started]
    assert observed_events(_obs(["n1"], pid=101), _obs(["n1"], pid=101)) == []
    # in backoff after 2 restarts, then started afresh under a new spec (its count starts over)
    assert observed_events(_spawning(restarts=2), _obs(["n1"], pid=101)) == [started]


def _spawning(restarts: int = 0) -> Observed:
    """n1 reports decode-0 without a pid (spawning, or waiting out a backoff)."""
    obs = _obs(["n1"], pid=1)
    proc = obs.statuses["n1"].processes[0].model_copy(
        update={"pid": None, "state": ProcessState.starting, "restarts": restarts})
    return dataclasses.replace(obs, statuses={"n1": obs.statuses["n1"].model_copy(update={"processes": [proc]})})


def test_no_process_event_without_a_pid_or_from_a_previous_agents_status():
    assert observed_events(_obs(["n1"], pid=100), _spawning()) == []  # stopped, or not started yet
    # status under another lease than the member's is history, not observation
    assert observed_events(_obs(["n1"], pid=100, status_lease=6), _obs(["n1"], pid=101, status_lease=6)) == []
    assert observed_events(_obs(["n1"], pid=100), _obs(["n1"], pid=101, restarts=1, status_lease=6)) == []


def test_new_leader_event():
    assert new_leader("n2") == ClusterEvent("leader", "n2 is the coordinator", {"node": "n2"})


def _assigned(*roles: str) -> dict[str, NodeAssignment | None]:
    return {"n1": NodeAssignment(node="n1", processes=[ProcessSpec(name=r, role=r, argv=["x"]) for r in roles])}


def test_write_events_name_the_roles_assigned_and_removed():
    record = SpecRecord(generation=1, spec={})
    obs = Observed(record=record, members={}, assignments=_assigned("mooncake-master", "decode"), statuses={})
    desired = Desired(assignments=_assigned("mooncake-master", "prefill", "proxy"), record=record, plan=None)
    assert write_events(obs, desired) == [
        ClusterEvent("assign", "prefill assigned", {"role": "prefill"}),
        ClusterEvent("assign", "proxy released: every engine is ready", {"role": "proxy"}),
        ClusterEvent("unassign", "decode removed", {"role": "decode"}),
    ]
    assert write_events(obs, dataclasses.replace(desired, assignments=dict(obs.assignments))) == []


def test_write_events_for_a_replan_and_a_master_restart():
    old = SpecRecord(generation=1, spec={}, placement={"decode": ["n2"]}, master_pid=10, master_epoch=0)
    obs = Observed(record=old, members={}, assignments={}, statuses={})
    new = old.model_copy(update={"placement": {"decode": ["n3"]}, "master_pid": 11, "master_epoch": 1})
    assert write_events(obs, Desired(assignments={}, record=new, plan=None)) == [
        ClusterEvent("replan", "placement now {'decode': ['n3']}", {"placement": {"decode": ["n3"]}}),
        ClusterEvent("master", "mooncake master restarted (pid 10 -> 11): restarting the engines, now that it is ready",
                     {"pid": 11, "epoch": 1}),
    ]
    first = old.model_copy(update={"placement": {}})  # the first placement is no replan
    assert write_events(dataclasses.replace(obs, record=first),
                        Desired(assignments={}, record=first.model_copy(update={"placement": {"decode": ["n2"]}}),
                                plan=None)) == []
