"""`start --wait` / `stop --wait`: a line only when something changes, fed a made-up sequence of
`GET /cluster` documents built by the real cluster view from agent statuses."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable

import pytest
from rich.console import Console

from agent.process.supervisor import backoff_message
from pdsupervisor.cli import progress as progress_module
from pdsupervisor.cli.cluster import wait_for_phase
from pdsupervisor.cli.progress import Lines, LiveLine, calm, progress_for_stdout, progress_line
from pdsupervisor.core.cluster_view import Observed, SpecRecord, cluster_document
from pdsupervisor.core.documents import ClusterDocument
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus

DECODE = ProcessSpec(name="decode-0", role="decode", argv=["x"], port=8200, start_timeout_s=30)
PREFILL = ProcessSpec(name="prefill-0", role="prefill", argv=["x"], port=8100, start_timeout_s=30)


def _doc(now: float, *statuses: ProcessStatus, action: str | None = "start") -> ClusterDocument:
    """The cluster document of n1 running DECODE and PREFILL, as its agent reports them."""
    record = SpecRecord(generation=1, action=action, spec={"cluster": "c"}, submitted_at=1.0) if action else None
    obs = Observed(
        record=record, members={"n1": NodeFacts(name="n1", ip="127.0.0.1", lease=7)},
        assignments={"n1": NodeAssignment(node="n1", processes=[DECODE, PREFILL])} if action else {},
        statuses={"n1": NodeStatus(node="n1", updated_at=now, lease=7, processes=list(statuses))},
    )
    return cluster_document(obs, now).model_copy(update={"missing": []})  # the record's spec is a stub


def _status(spec: ProcessSpec, state: ProcessState, **kw: object) -> ProcessStatus:
    fields: dict[str, object] = {"pid": 42, "started_at": 10.0, "spec_hash": spec.spec_hash(), **kw}
    return ProcessStatus(name=spec.name, role=spec.role, state=state, **fields)


def _crash_loop(restarts: int, delay: float) -> ProcessStatus:
    return _status(DECODE, ProcessState.backoff, restarts=restarts, last_exit_code=1,
                   message=backoff_message("exited (exit code 1)", delay, restarts + 1))


class FakeClient:
    """`GET /cluster` answering the given documents in turn."""

    def __init__(self, docs: Iterable[ClusterDocument]) -> None:
        self.docs = list(docs)
        self.polls = 0

    async def cluster(self) -> ClusterDocument:
        self.polls += 1
        return self.docs.pop(0)


def _wait(docs: list[ClusterDocument], want: str = "stopped") -> list[str]:
    lines: list[str] = []
    client = FakeClient(docs)
    asyncio.run(wait_for_phase(client, want, 60, lines.append, poll_s=0))
    assert client.docs == [] and client.polls == len(docs)
    return lines


def test_the_same_state_with_a_changing_countdown_is_one_line():
    ready = _status(PREFILL, ProcessState.ready)
    crash_loop = [_doc(20.0 + i, _crash_loop(restarts=4 + i // 3, delay=16.0 - i * 0.25), ready) for i in range(12)]
    assert len({tuple(d.problems) for d in crash_loop}) == 12  # every poll's problem text differs...
    lines = _wait([*crash_loop, _doc(40.0, action=None)])
    assert lines == [  # ...but it is one state: one line, then the phase change
        "starting: members 1, engines ready 1/2, proxy waiting; problems: decode-0 on n1: backoff (exit code 1): "
        "exited (exit code 1)",
        "stopped: members 1, engines ready 0/0, proxy waiting",
    ]


def test_a_phase_change_a_new_problem_and_a_resolved_one_are_each_a_line():
    ready = _status(PREFILL, ProcessState.ready)
    waiting = _status(PREFILL, ProcessState.running, started_at=35.0)  # within its start timeout throughout
    docs = [
        _doc(20.0, _status(DECODE, ProcessState.running), waiting),
        _doc(25.0, _status(DECODE, ProcessState.running), waiting),  # the same
        _doc(41.0, _status(DECODE, ProcessState.running), waiting),  # decode-0 past its start timeout: a problem
        _doc(42.0, _status(DECODE, ProcessState.running), waiting),  # 1 s more of the same
        _doc(43.0, _status(DECODE, ProcessState.ready), waiting),  # ready: resolved, and a count changed
        _doc(44.0, _status(DECODE, ProcessState.ready), ready),
        _doc(45.0, _status(DECODE, ProcessState.ready), ready, action="stop"),  # a new phase
        _doc(46.0, action=None),
    ]
    lines = _wait(docs)
    assert lines == [
        "starting: members 1, engines ready 0/2, proxy waiting",
        "starting: members 1, engines ready 0/2, proxy waiting; problems: decode-0 on n1: not ready after starting "
        "(start_timeout_s 30)",
        "starting: members 1, engines ready 1/2, proxy waiting",
        "starting: members 1, engines ready 2/2, proxy waiting",
        "stopping: members 1, engines ready 2/2, proxy waiting",
        "stopped: members 1, engines ready 0/0, proxy waiting",
    ]


def test_counters_are_left_out_of_problems_but_what_they_are_about_stays():
    assert calm("decode-0 on n2: backoff (exit code 127, restarts 12): spawn failed: [Errno 2] No such file; "
                "next attempt at 14:03:12 (in 14.3s, attempt 5)") == \
        "decode-0 on n2: backoff (exit code 127): spawn failed: [Errno 2] No such file"
    assert calm("cluster not ready 606 s after submission (policy.start_timeout_s 120)") == \
        "cluster not ready after submission (policy.start_timeout_s 120)"
    assert calm("proxy on g10: not ready since 14:03:12 (was ready): readiness probe failing (3x)") == \
        "proxy on g10: not ready since 14:03:12 (was ready): readiness probe failing (3x)"


def test_a_timeout_names_the_last_line():
    docs = [_doc(20.0, _crash_loop(restarts=1, delay=2.0))] * 3
    client = FakeClient(docs)
    with pytest.raises(TimeoutError, match=r"not stopped after 0s: starting: .* backoff \(exit code 1\)"):
        asyncio.run(wait_for_phase(client, "stopped", 0, lambda line: None, poll_s=0))


def test_on_a_terminal_one_live_line_and_the_last_one_stays():
    out = io.StringIO()
    live = LiveLine(Console(file=out, force_terminal=True, width=60))
    docs = [_doc(20.0 + i, _crash_loop(restarts=i, delay=8.0 - i)) for i in range(5)] + [_doc(30.0, action=None)]
    for doc in docs:
        live.show(doc)
    live.close()
    text = out.getvalue()
    assert text.rstrip().endswith("stopped: members 1, engines ready 0/0, proxy waiting")
    assert "next attempt" not in text


def test_plain_lines_when_stdout_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module.sys.stdout, "isatty", lambda: False)
    lines: list[str] = []
    printer = progress_for_stdout(lines.append)
    assert isinstance(printer, Lines)
    doc = _doc(20.0)
    printer.show(doc)
    printer.show(doc)
    printer.close()
    assert lines == [progress_line(doc)]
    monkeypatch.setattr(progress_module.sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_for_stdout(lines.append), LiveLine)
