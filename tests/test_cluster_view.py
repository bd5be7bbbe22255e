"""Pure cluster view: problems a person must see, from observed status alone."""

from __future__ import annotations

from pdsupervisor.cluster_view import Observed, SpecRecord, cluster_document
from pdsupervisor.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus


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
    assert doc["problems"] == ["decode-0 on n1: backoff (exit code 3, restarts 4): next try in 8 s"]


def test_not_ready_past_start_timeout_is_a_problem():
    assert cluster_document(_obs(ProcessState.running, 40.0), now=60.0)["problems"] == []
    doc = cluster_document(_obs(ProcessState.running, 40.0), now=80.0)
    assert doc["problems"] == ["decode-0 on n1: not ready 40 s after starting (start_timeout_s 30)"]


def test_status_of_a_previous_agent_is_not_observation():
    doc = cluster_document(_obs(ProcessState.ready, 40.0, member_lease=8, status_lease=7), now=60.0)
    row = doc["processes"][0]
    assert row["state"] == "pending" and row["pid"] is None
    fresh = cluster_document(_obs(ProcessState.ready, 40.0, member_lease=8, status_lease=8), now=60.0)
    assert fresh["processes"][0]["state"] == "ready" and fresh["processes"][0]["pid"] == 42
