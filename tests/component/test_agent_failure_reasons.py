"""Why a process failed, where people look: real child processes under a real supervisor (and
reconciler), their statuses turned into events by the coordinator's pure function."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.admission import Admission
from agent.lease import LeaseState
from agent.process.statefile import ProcStore
from agent.process.supervisor import ManagedProcess
from agent.reconciler import Reconciler
from pdsupervisor.core.cluster_view import Observed, problems_of
from pdsupervisor.core.events import ClusterEvent, observed_events
from pdsupervisor.core.exits import spoken_duration
from pdsupervisor.core.models import (
    NodeAssignment,
    NodeFacts,
    NodeStatus,
    Probe,
    ProcessSpec,
    ProcessState,
    ProcessStatus,
    RestartPolicy,
    StopEscalation,
)
from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree
from tests.conftest import until

FAST = RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.1, reset_after_s=30)
MISSING_LIB = "libfoo.so.1: cannot open shared object file: No such file or directory"
# ignores SIGTERM, says so once it does (the test stops it only then), sleeps
STUBBORN = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ignoring SIGTERM', flush=True)\n"
            "time.sleep(600)\n")
# fails with a traceback on its first `sys.argv[2]` runs (counted in the file `sys.argv[1]`), then
# listens on the port `sys.argv[3]` (its readiness)
FLAKY = ("import pathlib, socket, sys, time\n"
         "count = pathlib.Path(sys.argv[1])\n"
         "n = int(count.read_text()) if count.exists() else 0\n"
         "count.write_text(str(n + 1))\n"
         "if n < int(sys.argv[2]):\n"
         "    raise RuntimeError(f'no model yet (attempt {n + 1})')\n"
         "server = socket.create_server(('127.0.0.1', int(sys.argv[3])))\n"
         "time.sleep(600)\n")



def _log(m: ManagedProcess) -> list[str]:
    return m.log_path.read_text().splitlines() if m.log_path.exists() else []


async def test_a_missing_binary_says_so_in_the_status_and_the_log(managed):
    m = managed(ProcessSpec(name="decode-0", role="decode", argv=["/nonexistent/vllm", "serve"], restart=FAST))
    await until(lambda: m.state == ProcessState.backoff, what="backoff")
    why = "spawn failed: [Errno 2] No such file or directory: '/nonexistent/vllm'"
    st = m.status()
    assert st.message.startswith(f"{why}; next attempt at") and st.last_exit_code is None
    assert st.last_failure == why and st.failures_in_a_row >= 1 and st.down_since is not None
    lines = _log(m)
    assert lines[0].startswith("--- pd-agent: starting decode-0 (") and lines[1] == f"--- pd-agent: {why} ---"
    await until(lambda: m.restarts >= 1 and m.state == ProcessState.backoff, what="a second attempt")
    assert m.status().last_failure == why  # kept through the next attempt
    await m.stop()


async def test_a_missing_shared_library_is_the_reason_of_exit_127(managed, tmp_path):
    script = f"import sys; print('loading', flush=True); print({MISSING_LIB!r}, file=sys.stderr); sys.exit(127)"
    m = managed(ProcessSpec(name="mooncake-master", role="mooncake-master", argv=[sys.executable, "-c", script],
                            restart=FAST))
    await until(lambda: m.state == ProcessState.backoff, what="backoff")
    st = m.status()
    why = f"command not found or a shared library missing: {MISSING_LIB}"
    assert st.last_exit_code == 127 and st.last_failure == why and st.message.startswith(f"{why}; next attempt at")
    assert any(line.startswith("--- pd-agent: mooncake-master exited after ") and line.endswith(f"{why} ---")
               for line in _log(m))
    await m.stop()


async def test_a_process_killed_by_a_signal_says_which(managed):
    m = managed(ProcessSpec(name="p", role="prefill", argv=[sys.executable, "-c", "import os; os.abort()"],
                            restart=FAST))
    await until(lambda: m.state == ProcessState.backoff, what="backoff")
    assert m.status().last_failure == "killed by SIGABRT (6)" and m.status().last_exit_code == -6
    await m.stop()


async def test_a_stop_that_takes_sigkill_is_logged_and_recorded(managed, tmp_path):
    escalated: list[StopEscalation] = []
    m = managed(ProcessSpec(name="stubborn", role="decode", argv=[sys.executable, "-c", STUBBORN],
                            stop_timeout_s=0.5, restart=FAST))
    m.on_stop_escalated = escalated.append
    await until(lambda: "ignoring SIGTERM" in _log(m), what="the handler installed")
    pid = m.pid
    await m.stop()
    how = "SIGKILL after 0.5 s (SIGTERM ignored)"
    st = m.status()
    assert st.state == ProcessState.exited and st.message == f"stopped: {how}" and st.last_stop == how
    assert st.last_exit_code == -9
    assert [(e.process, e.how) for e in escalated] == [("stubborn", how)]
    assert _log(m)[-1] == f"--- pd-agent: stubborn: {how} ---"
    assert pid is not None


async def test_a_stop_obeyed_in_time_records_nothing(managed):
    m = managed(ProcessSpec(name="calm", role="decode", argv=[sys.executable, "-c", "import time; time.sleep(600)"],
                            stop_timeout_s=5, restart=FAST))
    await until(lambda: m.state == ProcessState.ready, what="ready")
    await m.stop()
    assert m.status().last_stop is None and m.status().message == "stopped"


def _observed(status: ProcessStatus, spec: ProcessSpec, stops: list[StopEscalation] | None = None) -> Observed:
    return Observed(record=None, members={"n1": NodeFacts(name="n1", ip="127.0.0.1", lease=7)},
                    assignments={"n1": NodeAssignment(node="n1", processes=[spec])},
                    statuses={"n1": NodeStatus(node="n1", updated_at=status.started_at or 1.0, lease=7,
                                               processes=[status], stops_escalated=stops or [])})


async def test_a_process_failing_twice_then_running_shows_why_throughout_and_is_ready_again(managed, tmp_path):
    port = free_port()
    spec = ProcessSpec(name="decode-0", role="decode", restart=FAST.model_copy(update={"reset_after_s": 3.0}),
                       argv=[sys.executable, "-c", FLAKY, str(tmp_path / "count"), "2", str(port)],
                       readiness=Probe(kind="tcp", port=port, period_s=0.1))
    seen: list[ProcessStatus] = []
    m = managed(spec, seen=seen)
    await until(lambda: m.state == ProcessState.ready and m.restarts == 2, timeout=20, what="ready after 2 failures")
    first = "exit code 1: RuntimeError: no model yet (attempt 1)"
    second = "exit code 1: RuntimeError: no model yet (attempt 2)"
    failed_at = next(i for i, st in enumerate(seen) if st.last_failure)
    assert seen[failed_at].last_failure == first and seen[failed_at].state == ProcessState.backoff
    # from the first failure until ready, every status says why: running again too
    between = seen[failed_at:-1]
    assert {st.state for st in between} == {ProcessState.backoff, ProcessState.running}
    assert all(st.last_failure in (first, second) and st.failures_in_a_row >= 1 for st in between)
    running_again = next(st for st in between if st.state == ProcessState.running and st.failures_in_a_row == 2)
    problems, _ = problems_of(_observed(running_again, spec), None, "starting", now=running_again.started_at or 0)
    assert problems == [f"decode-0 on n1: running again in a crash loop (2 failures in a row), last: {second}"]
    ready = seen[-1]
    assert ready.state == ProcessState.ready and ready.last_failure == second and ready.failures_in_a_row == 2
    assert ready.ready_again_at is not None and ready.down_since is None
    assert ready.ready_again_after_s is not None and ready.ready_again_after_s > 0
    # the coordinator's events over these statuses, one observation per change
    events = [e for a, b in zip(seen, seen[1:], strict=False)
              for e in observed_events(_observed(a, spec), _observed(b, spec))]
    assert [e.message for e in events] == [  # (its first status had its first pid already: no "started")
        f"decode-0 on n1 restarted: {first}",
        f"decode-0 on n1 restarted: {second}",
        f"decode-0 on n1 ready again after {spoken_duration(ready.ready_again_after_s)}",
    ]
    assert events[-1].fields["after_s"] == ready.ready_again_after_s
    # a run of reset_after_s ends the row: no longer a crash loop, the last reason kept
    await until(lambda: m.status().failures_in_a_row == 0, what="the row reset after a stable run")
    assert m.status().last_failure == second and m.status().state == ProcessState.ready
    await m.stop()


async def test_a_stop_escalated_for_a_process_the_assignment_dropped_is_an_event(tmp_path):
    """The process leaves the node's status with its stop; the escalation stays in it."""
    spec = ProcessSpec(name="stubborn", role="decode", argv=[sys.executable, "-c", STUBBORN], stop_timeout_s=0.5,
                       restart=FAST)
    lease = LeaseState(ttl=5)
    lease.lease_id = 7
    rec = Reconciler("n1", store=None, records=ProcStore(tmp_path / "procs"),  # type: ignore[arg-type]  # no refusal, no etcd
                     log_dir=tmp_path / "logs", lease=lease, admission=Admission(tmp_path))
    log = Path(tmp_path / "logs" / "stubborn.log")
    try:
        await rec.apply(NodeAssignment(node="n1", processes=[spec]))
        await until(lambda: log.exists() and "ignoring SIGTERM" in log.read_text(), what="the handler installed")
        before = rec.snapshot()
        await rec.apply(None)
        after = rec.snapshot()
    finally:
        for m in rec.procs.values():
            if m.pid:
                kill_tree(m.pid)
    assert after.processes == [] and [s.process for s in after.stops_escalated] == ["stubborn"]
    members = {"n1": NodeFacts(name="n1", ip="127.0.0.1", lease=7)}
    obs = [Observed(record=None, members=members, assignments={}, statuses={"n1": st}) for st in (before, after)]
    assert observed_events(*obs) == [ClusterEvent(
        "process", "stubborn on n1: stop escalated to SIGKILL after 0.5 s (SIGTERM ignored)",
        {"node": "n1", "process": "stubborn", "how": "SIGKILL after 0.5 s (SIGTERM ignored)"})]
    assert observed_events(obs[1], obs[1]) == []  # told once
