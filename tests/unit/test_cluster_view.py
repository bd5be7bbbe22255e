"""Pure cluster view: problems a person must see, from observed status alone."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from pdsupervisor.api.openapi import REF, openapi_document
from pdsupervisor.core import cluster_view
from pdsupervisor.core.cluster_view import Observed, SpecRecord, cluster_document, desired_state
from pdsupervisor.core.document_json import DocumentJson
from pdsupervisor.core.documents import ClusterDocument
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus
from pdsupervisor.core.node_engines import NODE_ENGINES
from tests.openapi_helpers import check_served, schema_errors, unlisted
from tests.view_helpers import demo_running, demo_spec, engines, settle

ROOT = Path(__file__).resolve().parents[2]


def _obs(state: ProcessState, started_at: float, member_lease: int = 7, status_lease: int = 7) -> Observed:
    spec = ProcessSpec(name="decode-0", role="decode", argv=["x"], port=8200, start_timeout_s=30)
    status = ProcessStatus(name="decode-0", role="decode", state=state, pid=42, restarts=4, last_exit_code=3,
                           started_at=started_at, spec_hash=spec.spec_hash(), message="next try in 8 s")
    return Observed(
        record=SpecRecord(generation=1, spec={"cluster": "c"}, submitted_at=1.0),
        members={"n1": NodeFacts(name="n1", ip="127.0.0.1", lease=member_lease)},
        assignments={"n1": NodeAssignment(node="n1", processes=[spec])},
        statuses={"n1": NodeStatus(node="n1", updated_at=50.0, lease=status_lease, processes=[status])},
    )


def test_backoff_is_a_problem_with_exit_code_and_message():
    doc = cluster_document(_obs(ProcessState.backoff, 40.0), now=60.0)
    assert doc.problems == ["decode-0 on n1: backoff (exit code 3, restarts 4): next try in 8 s"]


def test_not_ready_past_start_timeout_is_a_problem():
    assert cluster_document(_obs(ProcessState.running, 40.0), now=60.0).problems == []
    doc = cluster_document(_obs(ProcessState.running, 40.0), now=80.0)
    assert doc.problems == ["decode-0 on n1: not ready 40 s after starting (start_timeout_s 30)"]


def test_status_of_a_previous_agent_is_not_observation():
    doc = cluster_document(_obs(ProcessState.ready, 40.0, member_lease=8, status_lease=7), now=60.0)
    row = doc.processes[0]
    assert row.state == "pending" and row.pid is None
    fresh = cluster_document(_obs(ProcessState.ready, 40.0, member_lease=8, status_lease=8), now=60.0)
    assert fresh.processes[0].state == "ready" and fresh.processes[0].pid == 42


def test_an_observation_is_frozen():
    """Read at one revision, it stays that revision's view: a change is a new Observed."""
    obs = _obs(ProcessState.ready, 40.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.members = {}  # type: ignore[misc]  # the assignment under test
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.revision = 7  # type: ignore[misc]  # the assignment under test
    assert "n1" in obs.members and obs.revision == 0


def test_the_document_names_the_leader_read_with_it():
    assert cluster_document(dataclasses.replace(_obs(ProcessState.ready, 40.0), leader="n1"), now=60.0).leader == "n1"
    assert cluster_document(_obs(ProcessState.ready, 40.0), now=60.0).leader is None


def test_a_replace_that_restarts_the_master_restarts_each_engine_once():
    obs = demo_running(master_pid=500)
    assert obs.record.master_pid == 500 and obs.record.master_epoch == 0
    before = engines(obs.assignments)
    assert len(before) == 6

    # a replacing spec moves the master's port: the master restarts (new pid), and the
    # engines' Mooncake config changes with it
    obs = dataclasses.replace(obs, record=obs.record.model_copy(update={"generation": 2, "spec": demo_spec(50011)}))
    desired = desired_state(obs)
    assert engines(desired.assignments) == before  # held while the master restarts
    obs, history = settle(obs, {"mooncake-master": 600})
    for name in before:  # in waves, so at different steps; but each engine once
        hashes = [h[name] for h in [before, *history]]
        changed_at = next(i for i, h in enumerate(hashes) if h != hashes[0])
        assert set(hashes[changed_at:]) == {hashes[-1]}, f"{name} changes exactly once"
    after = history[-1]
    assert all(after[name] != before[name] for name in before)
    assert obs.record.master_pid == 600 and obs.record.master_epoch == 1


def test_a_master_crash_restarts_the_engines_after_it_is_ready_again():
    obs = demo_running(master_pid=500)
    before = engines(obs.assignments)
    obs, history = settle(obs, {"mooncake-master": 501})  # same spec, new pid: it crashed
    assert obs.record.master_epoch == 1
    assert all(history[-1][name] != before[name] for name in before)


def test_a_replacing_spec_is_not_ready_until_the_coordinator_applied_it():
    obs = demo_running(master_pid=500)
    assert cluster_document(obs, now=10.0).phase == "ready"
    replaced = dataclasses.replace(obs, record=obs.record.model_copy(update={"generation": 2, "spec": demo_spec(50011)}))
    doc = cluster_document(replaced, now=10.0)  # every process still ready, under the old spec
    assert doc.generation == 2 and doc.phase == "updating"
    settled, _ = settle(replaced, {"mooncake-master": 600})
    assert cluster_document(settled, now=10.0).phase == "ready"


def test_a_node_lost_under_wait_still_shows_where_the_running_proxy_is():
    obs = demo_running(master_pid=500)
    lost = dataclasses.replace(obs, members={n: m for n, m in obs.members.items() if n != "node3"})
    doc = cluster_document(lost, now=10.0)
    assert doc.phase == "degraded" and any("node3" in m for m in doc.missing)
    assert doc.proxy_url == "http://127.0.0.1:8868"


def test_record_bookkeeping_alone_does_not_unready_the_cluster():
    obs = demo_running(master_pid=500)
    stale = dataclasses.replace(obs, record=obs.record.model_copy(update={"placement": {}}))
    assert desired_state(stale).record != stale.record  # the coordinator would rewrite the record
    assert cluster_document(stale, now=10.0).phase == "ready"


def test_a_replacing_spec_that_adds_engines_is_updating_not_degraded():
    obs = demo_running(master_pid=500)
    slots = obs.record.spec["decode"]["slots"]
    # more decode engines per node (processes nobody runs yet); the master's spec unchanged
    replaced = dataclasses.replace(obs, record=obs.record.model_copy(
        update={"generation": 2, "spec": demo_spec(50001, decode_slots=slots * 2)}))
    before = {(n, p.name) for n, a in obs.assignments.items() for p in a.processes}
    planned = {(n, p.name) for n, p in desired_state(replaced).plan.assignable()}
    assert before < planned  # the new spec has engines that are not assigned yet
    # the DP size changes too, so the running decode engines take a new spec (one group wave)
    assert cluster_document(replaced, now=10.0).phase == "updating"
    settled, _ = settle(replaced, {"mooncake-master": 500})
    assert cluster_document(settled, now=10.0).phase == "ready"


def test_the_document_is_what_the_openapi_schema_describes():
    openapi = openapi_document()
    for doc in (cluster_document(_obs(ProcessState.backoff, 40.0), now=60.0),
                cluster_document(demo_running(master_pid=500), now=10.0)):
        served = doc.model_dump(mode="json")
        assert served["processes"] and served["placement"] is not None
        check_served(openapi, "ClusterDocument", served)
        assert ClusterDocument.model_validate(served) == doc  # what the client reads back
    row = served["processes"][0]
    assert schema_errors(openapi, "ClusterDocument", {**served, "processes": [{**row, "role": "bogus"}]}) != []
    grown = {**served, "new": 1, "processes": [{**row, "new": 2}]}
    assert set(unlisted(openapi, {"$ref": REF.format(model="ClusterDocument")}, grown)) == {"$.new", "$.processes[0].new"}


# ---- honest problems: lost readiness, planned stops --------------------------------------------

def _seen(obs: Observed, **status: object) -> Observed:
    """`obs` with its one process's status changed."""
    node = obs.statuses["n1"]
    changed = node.processes[0].model_copy(update=status)
    return dataclasses.replace(obs, statuses={"n1": node.model_copy(update={"processes": [changed]})})


def test_readiness_lost_after_being_ready_is_said_as_such_with_since_when():
    from pdsupervisor.core.cluster_view import clock

    up_for_minutes = _seen(_obs(ProcessState.running, 40.0), ready_lost_at=600.0,
                           message="readiness probe failing (3x)")
    doc = cluster_document(up_for_minutes, now=646.0)
    assert doc.problems == [f"decode-0 on n1: not ready since {clock(600.0, 646.0)} (was ready): "
                            "readiness probe failing (3x)"]
    assert "after starting" not in doc.problems[0]
    assert doc.problems == cluster_document(up_for_minutes, now=700.0).problems  # no counter in it


def test_a_moment_is_the_time_of_day_or_with_the_date_when_older():
    from pdsupervisor.core.cluster_view import clock

    assert clock(1_000_000.0, 1_000_060.0) == time.strftime("%H:%M:%S", time.localtime(1_000_000.0))
    assert clock(1_000_000.0, 1_000_000.0 + 86400) == time.strftime("%Y-%m-%d %H:%M:%S",
                                                                    time.localtime(1_000_000.0))


def test_a_process_stopped_on_purpose_is_not_a_problem():
    stopping = _seen(_obs(ProcessState.stopping, 40.0), message="stopping with SIGTERM")
    assert cluster_document(stopping, now=600.0).problems == []  # past its start timeout, too
    replaced = _seen(_obs(ProcessState.exited, 40.0), spec_hash="0ld5pec", message="stopped")
    assert cluster_document(replaced, now=60.0).problems == []  # a previous spec, stopped for the new one


def test_an_exit_of_the_assigned_spec_is_still_a_problem():
    ended = _seen(_obs(ProcessState.exited, 40.0), last_exit_code=0, message="exited (exit code 0); restart policy never")
    assert cluster_document(ended, now=60.0).problems == [
        "decode-0 on n1: exited (exit code 0, restarts 4): exited (exit code 0); restart policy never"]


def test_an_old_agents_status_without_the_new_field_still_reads():
    old = _obs(ProcessState.ready, 40.0).statuses["n1"].model_dump(mode="json")
    del old["processes"][0]["ready_lost_at"]
    assert NodeStatus.model_validate(old).processes[0].ready_lost_at is None


def test_a_crash_loop_reads_crash_looping_between_its_failures_too():
    for state in (ProcessState.running, ProcessState.starting, ProcessState.backoff):
        obs = _seen(_obs(state, 40.0), failures_in_a_row=3, last_failure="exit code 1: RuntimeError: boom")
        row = cluster_document(obs, now=60.0).processes[0]
        assert row.state == "crash-looping" and row.last_failure == "exit code 1: RuntimeError: boom"
    once = cluster_document(_seen(_obs(ProcessState.running, 40.0), failures_in_a_row=1, last_failure="x"), now=60.0)
    assert once.processes[0].state == "running"
    ready = cluster_document(_seen(_obs(ProcessState.ready, 40.0), failures_in_a_row=3, last_failure="x"), now=60.0)
    assert ready.processes[0].state == "ready"


def test_a_spec_hash_kept_is_dropped_when_the_spec_changes():
    """The digest is computed once per object; a copy with a change, or a field set, has its own."""
    spec = ProcessSpec(name="decode-0", role="decode", argv=["x"], port=8200)
    digest = spec.spec_hash()
    assert spec.spec_hash() is digest
    moved = spec.model_copy(update={"port": 8201})
    assert moved.spec_hash() != digest and moved.spec_hash() == ProcessSpec(**{**spec.model_dump(), "port": 8201}).spec_hash()
    assert spec.model_copy().spec_hash() == digest
    unhashed = ProcessSpec(name="decode-0", role="decode", argv=["x"], port=8200)
    assert unhashed == spec and spec == unhashed  # equality looks at the fields only
    assert spec.model_dump() == unhashed.model_dump()
    spec.restart_epoch = 1
    assert spec.spec_hash() != digest


def test_known_equal_assignments_are_not_compared_again(monkeypatch):
    from pdsupervisor.core.cluster_view import KnownEqual

    # what `_same_objects` compares: a new field of NodeAssignment must be added there
    assert set(NodeAssignment.model_fields) == {"node", "generation", "processes"}
    procs = [ProcessSpec(name=f"decode-{i}", role="decode", argv=["x"], port=8200 + i) for i in range(2)]
    have = NodeAssignment.model_validate_json(NodeAssignment(node="n1", processes=procs).model_dump_json())
    known = KnownEqual()
    assert known.equal("n1", have, NodeAssignment(node="n1", processes=procs))  # compared: equal

    def no_compare(self, other):
        raise AssertionError("compared again")

    monkeypatch.setattr(NodeAssignment, "__eq__", no_compare)
    assert known.equal("n1", have, NodeAssignment(node="n1", processes=list(procs)))  # the same objects: known
    with pytest.raises(AssertionError, match="compared again"):  # another observed object: compared
        known.equal("n1", have.model_copy(), NodeAssignment(node="n1", processes=procs))
    monkeypatch.undo()
    moved = [procs[0], procs[1].model_copy(update={"port": 9000})]
    assert not known.equal("n1", have, NodeAssignment(node="n1", processes=moved))
    assert known.equal("n1", have, NodeAssignment(node="n1", processes=procs))  # known again
    assert not known.equal("n1", have, NodeAssignment(node="n1", generation=2, processes=procs))


def test_same_spec_is_the_spec_hash_compared():
    from pdsupervisor.core.models import DrainSpec, same_spec

    spec = ProcessSpec(name="decode-0", role="decode", argv=["x"], port=8200)
    decoded = ProcessSpec.model_validate_json(spec.model_dump_json())
    assert same_spec(spec, decoded) and "_spec_hash" not in decoded.__dict__  # equal: no hashing needed
    drained = spec.model_copy(update={"generation": 3, "drain": DrainSpec(timeout_s=5)})  # neither is hashed
    assert spec != drained and same_spec(spec, drained)
    assert not same_spec(spec, spec.model_copy(update={"argv": ["y"]}))


def test_same_spec_keeps_its_answer_for_the_same_two_objects(monkeypatch):
    from pdsupervisor.core.models import same_spec

    held = ProcessSpec.model_validate_json(ProcessSpec(name="decode-0", role="decode", argv=["x"]).model_dump_json())
    planned = ProcessSpec(name="decode-0", role="decode", argv=["x"])
    assert same_spec(held, planned)

    def no_compare(self, other):
        raise AssertionError("compared again")

    monkeypatch.setattr(ProcessSpec, "__eq__", no_compare)
    assert same_spec(held, planned)  # kept
    with pytest.raises(AssertionError, match="compared again"):
        same_spec(held, ProcessSpec(name="decode-0", role="decode", argv=["x"]))  # another object: judged anew
    monkeypatch.undo()
    held.argv = ["y"]  # a field set: judged anew
    assert not same_spec(held, planned)
    assert not same_spec(held.model_copy(update={"port": 1}), planned)


def _one_pid_changed(obs: Observed, node: str, pid: int) -> Observed:
    """`obs` at a next revision where one node's agent reports another pid (a new status object)."""
    status = obs.statuses[node]
    fresh = status.model_copy(update={"processes": [p.model_copy(update={"pid": pid}) for p in status.processes]})
    return dataclasses.replace(obs, statuses={**obs.statuses, node: fresh}, revision=obs.revision + 1)


def test_document_rows_are_made_again_only_for_a_node_whose_inputs_changed():
    memo = cluster_view.RowMemo()
    obs = demo_running(master_pid=100)
    rows = [memo.rows(obs, n, a) for n, a in sorted(obs.assignments.items())]
    assert memo.made == 3
    changed = _one_pid_changed(obs, "node2", 4242)
    again = [memo.rows(changed, n, a) for n, a in sorted(changed.assignments.items())]
    assert memo.made == 4  # node2 only
    assert again[0] is rows[0] and again[2] is rows[2] and again[1] is not rows[1]
    assert {r.pid for r in again[1]} == {4242}
    lost = dataclasses.replace(changed, members={n: m for n, m in changed.members.items() if n != "node3"})
    assert {r.state for r in memo.rows(lost, "node3", lost.assignments["node3"])} == {"lost"}
    assert memo.made == 5


def test_the_document_with_rows_kept_is_the_document_made_afresh():
    obs = demo_running(master_pid=100)
    cluster_document(obs, now=60.0)
    changed = _one_pid_changed(obs, "node1", 4242)
    kept = cluster_document(changed, now=60.0)
    cluster_view.ROWS = cluster_view.RowMemo()
    try:
        assert kept == cluster_document(changed, now=60.0)
    finally:
        cluster_view.ROWS = cluster_view.RowMemo()
    assert any(r.pid == 4242 for r in kept.processes if r.node == "node1")


def test_the_desired_state_of_one_observation_is_made_once_for_both_askers(monkeypatch):
    made: list[float] = []
    real = cluster_view.desired_state

    def counted(obs: Observed, now: float | None = None) -> cluster_view.Desired:
        made.append(now or 0.0)
        return real(obs, now)

    monkeypatch.setattr(cluster_view, "desired_state", counted)
    shared = cluster_view.SharedDesired(max_age_s=0.5)
    obs = demo_running(master_pid=100)
    first = shared.get(obs, 10.0)
    assert shared.get(obs, 10.4) is first and made == [10.0]  # the coordinator, then GET /cluster
    assert shared.get(obs, 11.0) is not first and made == [10.0, 11.0]  # the clock moved on: afresh
    other = _one_pid_changed(obs, "node1", 7)
    shared.get(other, 11.0)
    assert made == [10.0, 11.0, 11.0]  # another revision: afresh


def _revisions() -> list[Observed]:
    """A settled cluster, then one change after another, each a next revision of the last: a
    status, an assignment decoded anew (another object, same content), a process unassigned,
    a member lost, and a replacing spec."""
    obs = demo_running(master_pid=100)
    seen = [obs, _one_pid_changed(obs, "node1", 4242)]
    last = seen[-1]
    status = last.statuses["node1"]
    troubled = [p.model_copy(update={"state": ProcessState.backoff, "last_exit_code": 3, "restarts": 2,
                                     "message": "next try in 8 s"}) if i == 0 else
                p.model_copy(update={"state": ProcessState.running, "ready_lost_at": 50.0}) if i == 1 else p
                for i, p in enumerate(status.processes)]
    seen.append(dataclasses.replace(last, statuses={**last.statuses, "node1": status.model_copy(
        update={"processes": troubled})}, revision=last.revision + 1))
    last = seen[-1]
    decoded = NodeAssignment.model_validate_json(last.assignments["node2"].model_dump_json())
    seen.append(dataclasses.replace(last, assignments={**last.assignments, "node2": decoded}, revision=last.revision + 1))
    last = seen[-1]
    shorter = last.assignments["node2"].model_copy(update={"processes": last.assignments["node2"].processes[:-1]})
    seen.append(dataclasses.replace(last, assignments={**last.assignments, "node2": shorter}, revision=last.revision + 1))
    last = seen[-1]
    seen.append(dataclasses.replace(last, assignments={n: a for n, a in last.assignments.items() if n != "node3"},
                                    revision=last.revision + 1))
    last = seen[-2]
    seen.append(dataclasses.replace(last, members={n: m for n, m in last.members.items() if n != "node3"},
                                    revision=last.revision + 1))
    last = seen[0]
    assert last.record is not None
    replaced = last.record.model_copy(update={"generation": 2, "spec": demo_spec(50002)})
    seen.append(dataclasses.replace(last, record=replaced, revision=last.revision + 10))
    return seen


@pytest.mark.parametrize("now", [60.0, 10_000.0])
def test_what_the_view_keeps_between_revisions_changes_nothing_it_answers(now):
    cluster_view.forget_kept()
    try:
        kept = []
        for obs in _revisions():
            desired = desired_state(obs, now)
            kept.append((desired.assignments, desired.record, cluster_document(obs, now)))
        fresh = []
        for obs in _revisions():
            cluster_view.forget_kept()
            desired = desired_state(obs, now)
            fresh.append((desired.assignments, desired.record, cluster_document(obs, now)))
        assert kept == fresh
        phases = [doc.phase for _, _, doc in kept]
        assert phases[0] == "ready" and "degraded" in phases and phases[-1] == "updating"
        assert any("backoff" in p for p in kept[2][2].problems)
        assert any("not ready since" in p for p in kept[2][2].problems)
        assert any(r.node == "node3" for r in kept[5][2].processes)  # planned, not assigned: from the plan
    finally:
        cluster_view.forget_kept()


def test_a_wanted_assignment_equal_to_the_observed_one_is_that_object():
    obs = demo_running(master_pid=100)
    desired = desired_state(obs)
    assert all(desired.assignments[n] is a for n, a in obs.assignments.items())
    decoded = {n: NodeAssignment.model_validate_json(a.model_dump_json()) for n, a in obs.assignments.items()}
    again = desired_state(dataclasses.replace(obs, assignments=decoded))
    assert again.assignments == decoded and not cluster_view.changes(obs, again)


def test_a_status_change_asks_only_that_node_again():
    cluster_view.forget_kept()
    try:
        obs = demo_running(master_pid=100)
        cluster_document(obs, now=60.0)
        made = NODE_ENGINES.made
        changed = _one_pid_changed(obs, "node2", 4242)
        desired_state(changed, 60.0)
        cluster_document(changed, now=60.0)
        assert NODE_ENGINES.made == made + 1
    finally:
        cluster_view.forget_kept()


def test_the_json_assembled_from_kept_rows_is_the_documents_own():
    cluster_view.forget_kept()
    json = DocumentJson()
    try:
        for obs in _revisions():
            doc = cluster_document(obs, now=60.0)
            assert json.body(doc) == doc.model_dump_json().encode()
            made = json.made
            assert json.body(doc) == doc.model_dump_json().encode() and json.made == made  # all kept
        assert json.made < sum(len(cluster_document(o, now=60.0).processes) for o in _revisions())
    finally:
        cluster_view.forget_kept()
