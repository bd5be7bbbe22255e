"""Reasons where people look: events and problems from what agents report about failures."""

from __future__ import annotations

import pytest

from agent.process.supervisor import backoff_message
from pdsupervisor.cli.progress import calm
from pdsupervisor.core.cluster_view import Observed, problems_of
from pdsupervisor.core.events import ClusterEvent, observed_events
from pdsupervisor.core.models import (
    NodeAssignment,
    NodeFacts,
    NodeStatus,
    ProcessSpec,
    ProcessState,
    ProcessStatus,
    StopEscalation,
)

DECODE = ProcessSpec(name="decode-0", role="decode", argv=["vllm"])
SPAWN = "spawn failed: [Errno 2] No such file or directory: 'vllm'"
LIB = "command not found or a shared library missing: libibverbs.so.1: cannot open shared object file"
IDS = {"node": "n2", "process": "decode-0"}


def _st(state: ProcessState = ProcessState.ready, **kw: object) -> ProcessStatus:
    fields: dict[str, object] = {"pid": 100, "spec_hash": DECODE.spec_hash(), **kw}
    return ProcessStatus(name="decode-0", role="decode", state=state, **fields)


def _obs(*procs: ProcessStatus, stops: tuple[StopEscalation, ...] = (), lease: int = 7) -> Observed:
    return Observed(record=None, members={"n2": NodeFacts(name="n2", ip="127.0.0.1", lease=7)},
                    assignments={"n2": NodeAssignment(node="n2", processes=[DECODE])},
                    statuses={"n2": NodeStatus(node="n2", updated_at=1.0, lease=lease, processes=list(procs),
                                               stops_escalated=list(stops))})


def _events(before: ProcessStatus, after: ProcessStatus) -> list[ClusterEvent]:
    return observed_events(_obs(before), _obs(after))


# ---- events ------------------------------------------------------------------------------


def test_a_restart_says_why():
    failed = {"last_failure": LIB, "last_failure_at": 50.0, "failures_in_a_row": 1, "last_exit_code": 127}
    assert _events(_st(), _st(ProcessState.running, pid=101, restarts=1, **failed)) == [ClusterEvent(
        "process", f"decode-0 on n2 restarted: {LIB}",
        {**IDS, "exit_code": 127, "restarts": 1, "reason": LIB})]


def test_a_failed_spawn_is_an_event_without_a_pid():
    first = _st(ProcessState.backoff, pid=None, last_failure=SPAWN, last_failure_at=10.0, failures_in_a_row=1)
    again = first.model_copy(update={"restarts": 1, "last_failure_at": 11.0, "failures_in_a_row": 2})
    assert _events(first, again) == [ClusterEvent(
        "process", f"decode-0 on n2 restarted: {SPAWN}", {**IDS, "exit_code": None, "restarts": 1, "reason": SPAWN})]
    assert _events(again, again) == []


def test_a_failure_without_a_restart_is_an_event_once():
    running = _st(ProcessState.running)
    failed = _st(ProcessState.failed, pid=None, last_exit_code=1, last_failure="exit code 1: boom",
                 last_failure_at=20.0, failures_in_a_row=1)
    assert _events(running, failed) == [ClusterEvent(
        "process", "decode-0 on n2 failed, not restarted: exit code 1: boom",
        {**IDS, "exit_code": 1, "reason": "exit code 1: boom"})]
    assert _events(failed, failed) == []


def test_ready_again_after_a_failure_says_how_long_it_took():
    down = _st(ProcessState.running, pid=101, restarts=3, last_failure=LIB, last_failure_at=40.0,
               failures_in_a_row=3, down_since=10.0)
    ready = down.model_copy(update={"state": ProcessState.ready, "down_since": None, "ready_again_at": 123.0,
                                    "ready_again_after_s": 113.0})
    assert _events(down, ready) == [ClusterEvent("process", "decode-0 on n2 ready again after 1 min 53 s",
                                                 {**IDS, "after_s": 113.0})]
    assert _events(ready, ready) == []
    # readiness lost and found again, without a failure: not "ready again after a failure"
    lost = ready.model_copy(update={"state": ProcessState.running, "ready_lost_at": 200.0})
    assert _events(ready, lost) == [] and _events(lost, ready) == []


def test_ready_again_then_failed_again_between_two_observations_in_that_order():
    down = _st(ProcessState.backoff, pid=None, restarts=1, last_failure="exit code 1: a", last_failure_at=10.0,
               failures_in_a_row=1, down_since=10.0)
    later = _st(ProcessState.running, pid=102, restarts=2, last_failure="exit code 1: b", last_failure_at=30.0,
                failures_in_a_row=2, down_since=30.0, ready_again_at=20.0, ready_again_after_s=10.0)
    assert [e.message for e in _events(down, later)] == [
        "decode-0 on n2 ready again after 10 s", "decode-0 on n2 restarted: exit code 1: b"]


def test_a_stop_escalated_to_sigkill_is_an_event_once():
    how = "SIGKILL after 30 s (SIGTERM ignored)"
    first = StopEscalation(process="decode-0", at=5.0, how=how)
    second = StopEscalation(process="prefill-0", at=9.0, how="SIGKILL after 30 s (SIGTERM ignored by 2 of its processes)")
    assert observed_events(_obs(_st()), _obs(_st(), stops=(first,))) == [ClusterEvent(
        "process", f"decode-0 on n2: stop escalated to {how}", {**IDS, "how": how})]
    assert [e.message for e in observed_events(_obs(stops=(first,)), _obs(stops=(first, second)))] == [
        "prefill-0 on n2: stop escalated to SIGKILL after 30 s (SIGTERM ignored by 2 of its processes)"]
    assert observed_events(_obs(stops=(first,)), _obs(stops=(first,))) == []
    # no history: a new leader, or a node whose status was not current (another lease) before
    assert observed_events(None, _obs(stops=(first,))) == []
    assert observed_events(_obs(lease=6), _obs(stops=(first,))) == []


# ---- problems ----------------------------------------------------------------------------


def _problems(seen: ProcessStatus) -> list[str]:
    return problems_of(_obs(seen), None, "starting", now=100.0)[0]


def test_a_spawn_failure_is_no_exit_code_none():
    seen = _st(ProcessState.backoff, pid=None, restarts=3, last_failure=SPAWN, last_failure_at=90.0,
               failures_in_a_row=4, message=backoff_message(SPAWN, 8.0, 4))
    [problem] = _problems(seen)
    assert problem.startswith(f"decode-0 on n2: backoff (restarts 3): {SPAWN}; next attempt at ")
    assert "None" not in problem
    assert calm(problem) == f"decode-0 on n2: backoff: {SPAWN}"  # the --wait line


@pytest.mark.parametrize("code, reason, counts", [
    (127, LIB, "exit code 127, restarts 2"),
    (-9, "killed by SIGKILL (9)", "exit code -9, restarts 2"),
    (1, "exit code 1: RuntimeError: CUDA out of memory", "restarts 2"),  # the reason says it already
    (137, "exit code 137: killed by SIGKILL (9), as a shell reports it", "restarts 2"),
])
def test_a_backoff_names_the_reason(code, reason, counts):
    seen = _st(ProcessState.backoff, pid=None, restarts=2, last_exit_code=code, last_failure=reason,
               last_failure_at=90.0, failures_in_a_row=3, message=backoff_message(reason, 4.0, 3))
    [problem] = _problems(seen)
    assert problem.startswith(f"decode-0 on n2: backoff ({counts}): {reason}; next attempt at ")


def test_a_crash_loop_shows_while_starting_or_running_between_failures():
    loop = _st(ProcessState.running, restarts=4, last_exit_code=127, last_failure=LIB, last_failure_at=90.0,
               failures_in_a_row=4, down_since=10.0, started_at=95.0)
    assert _problems(loop) == [f"decode-0 on n2: running again in a crash loop (4 failures in a row), last: {LIB}"]
    starting = loop.model_copy(update={"state": ProcessState.starting, "pid": None})
    assert _problems(starting) == [
        f"decode-0 on n2: starting again in a crash loop (4 failures in a row), last: {LIB}"]
    once = loop.model_copy(update={"failures_in_a_row": 1})
    assert _problems(once) == [f"decode-0 on n2: running again after a failure: {LIB}"]


def test_no_problem_once_ready_or_once_a_run_lasted():
    ready = _st(ProcessState.ready, restarts=4, last_failure=LIB, last_failure_at=90.0, failures_in_a_row=4,
                ready_again_at=99.0, ready_again_after_s=89.0)
    assert _problems(ready) == []
    stable = ready.model_copy(update={"state": ProcessState.running, "failures_in_a_row": 0})
    assert _problems(stable) == []  # the last reason is kept, but the row is over


def test_a_process_stopped_on_purpose_after_failures_is_no_problem():
    stopping = _st(ProcessState.stopping, last_failure=LIB, last_failure_at=90.0, failures_in_a_row=2)
    assert _problems(stopping) == []


def test_an_older_agents_status_without_the_new_fields_still_reads():
    old = _obs(_st()).statuses["n2"].model_dump(mode="json")
    del old["stops_escalated"]
    for key in ("last_failure", "last_failure_at", "failures_in_a_row", "down_since", "ready_again_at",
                "ready_again_after_s", "last_stop"):
        del old["processes"][0][key]
    st = NodeStatus.model_validate(old)
    assert st.stops_escalated == [] and st.processes[0].last_failure is None
    assert st.processes[0].failures_in_a_row == 0 and not st.processes[0].crash_looping
