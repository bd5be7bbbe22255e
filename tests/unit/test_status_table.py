"""`pdsupervisor status`: the problems list says why, as the process said it."""

from __future__ import annotations

import dataclasses
import io

from rich.console import Console

from agent.process.supervisor import backoff_message
from pdsupervisor.cli.cluster import status_table
from pdsupervisor.core.cluster_view import Observed, SpecRecord, cluster_document, desired_state
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus
from tests.view_helpers import demo_running, demo_spec

DECODE = ProcessSpec(name="decode-0", role="decode", argv=["vllm"], port=8200)


def _shown(**status: object) -> str:
    seen = ProcessStatus(name="decode-0", role="decode", spec_hash=DECODE.spec_hash(), **status)
    obs = Observed(record=SpecRecord(generation=1, spec={"cluster": "c"}),
                   members={"n2": NodeFacts(name="n2", ip="127.0.0.1", lease=7)},
                   assignments={"n2": NodeAssignment(node="n2", processes=[DECODE])},
                   statuses={"n2": NodeStatus(node="n2", updated_at=1.0, lease=7, processes=[seen])})
    out = io.StringIO()
    status_table(cluster_document(obs, now=2.0), Console(file=out, width=300))
    return out.getvalue()


def test_a_spawn_failure_is_shown_with_its_error_not_exit_code_none():
    why = "spawn failed: [Errno 2] No such file or directory: 'vllm'"
    text = _shown(state=ProcessState.backoff, restarts=3, last_failure=why, last_failure_at=1.0, failures_in_a_row=4,
                  message=backoff_message(why, 8.0, 4))
    assert f"problem decode-0 on n2: backoff (restarts 3): {why}; next attempt at" in text
    assert "exit code None" not in text


def test_what_a_process_printed_is_shown_as_is_never_as_markup():
    why = "exit code 1: [rank0]: torch.OutOfMemoryError [/x]"
    text = _shown(state=ProcessState.running, pid=42, restarts=2, last_exit_code=1, last_failure=why,
                  last_failure_at=1.0, failures_in_a_row=2)
    assert f"problem decode-0 on n2: running again in a crash loop (2 failures in a row), last: {why}" in text
    assert f"crash loop decode-0 on n2: restarts 2, last: {why}" in text  # and its row reads crash-looping


def test_a_rollout_is_shown_with_its_progress_per_role():
    obs = demo_running(master_pid=500)
    spec = demo_spec(50001)
    spec["prefill"]["env"] = {**spec["prefill"]["env"], "X": "1"}
    replaced = dataclasses.replace(obs, record=obs.record.model_copy(update={"generation": 2, "spec": spec}))
    assert desired_state(replaced).rollout.active
    out = io.StringIO()
    status_table(cluster_document(replaced, now=2.0), Console(file=out, width=300))
    text = out.getvalue()
    assert "phase: updating" in text
    assert ("rollout updating: prefill 0/2 changed, 0 not ready (at most 1 at a time); "
            "decode 4/4 changed, 0 not ready (a DP group: one wave)") in text
