"""Rolling, canaried changes, decided from pure observations of the demo cluster (2 prefill
engines on node1; 4 decode engines on node2 and node3: one DP group)."""

from __future__ import annotations

import dataclasses

from pdsupervisor.core.cluster_view import change_impact, cluster_document, desired_state, forget_kept
from pdsupervisor.core.events import rollout_halted, write_events
from pdsupervisor.core.models import NodeAssignment, ProcessState
from pdsupervisor.core.observed import Observed
from pdsupervisor.core.rollout import how_roles_change
from tests.view_helpers import demo_running, demo_spec, engines, running, settle


def _replaced(obs: Observed, **role_env: dict[str, str]) -> Observed:
    """`obs` with a replacing spec (next generation) that sets env vars of roles."""
    spec = demo_spec(50001)
    for role, env in role_env.items():
        spec[role]["env"] = {**spec[role]["env"], **env}
    return dataclasses.replace(obs, record=obs.record.model_copy(update={"generation": obs.record.generation + 1,
                                                                         "spec": spec}))


def _applied(obs: Observed, assignments: dict[str, NodeAssignment | None], **states: dict) -> Observed:
    """The agents run `assignments`; processes named in `states` report those status fields."""
    out = running(obs, assignments, {"mooncake-master": 500})
    statuses = {}
    for node, status in out.statuses.items():
        procs = [p.model_copy(update=states.get(p.name.replace("-", "_"), {})) for p in status.processes]
        statuses[node] = status.model_copy(update={"processes": procs})
    return dataclasses.replace(out, statuses=statuses)


def _changed(before: dict, after: dict) -> set[str]:
    return {name for (_, name), h in after.items() if before.get((_, name)) != h}


def test_a_prefill_change_rolls_one_engine_at_a_time_and_waits_for_it_to_be_ready():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    before = engines(obs.assignments)
    first = desired_state(obs)
    assert _changed(before, engines(first.assignments)) == {"prefill-0"}  # 25% of 2, at least 1
    assert first.rollout is not None and first.rollout.active and not first.rollout.halted
    # the canary runs its new spec but is not ready yet: the other engine stays as it is
    starting = _applied(obs, first.assignments, prefill_0={"state": ProcessState.running})
    assert engines(desired_state(starting).assignments) == engines(first.assignments)
    assert cluster_document(starting, now=10.0).phase == "updating"
    # ready: the next wave
    ready = _applied(obs, first.assignments)
    second = desired_state(ready)
    assert _changed(before, engines(second.assignments)) == {"prefill-0", "prefill-1"}
    settled, _ = settle(ready, {"mooncake-master": 500})
    assert cluster_document(settled, now=10.0).phase == "ready"
    assert cluster_document(settled, now=10.0).rollout is None


def test_the_wave_is_an_event_that_says_how_it_rolls():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    events = [e for e in write_events(obs, desired_state(obs)) if e.kind == "rollout"]
    assert [e.message for e in events] == ["rolling out to prefill-0 on node1 (at most 1 prefill not ready at a time)"]


def test_a_decode_dp_group_changes_as_one_unit():
    obs = _replaced(demo_running(master_pid=500), decode={"X": "1"})
    before = engines(obs.assignments)
    changed = _changed(before, engines(desired_state(obs).assignments))
    assert changed == {"decode-0", "decode-1"} and len([k for k in before if k[1].startswith("decode")]) == 4
    after = engines(desired_state(obs).assignments)
    assert all(after[k] != before[k] for k in before if k[1].startswith("decode"))  # both nodes, every rank
    assert all(after[k] == before[k] for k in before if k[1].startswith("prefill"))


def test_a_failing_canary_halts_the_rollout_and_the_old_engines_keep_running():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    before = engines(obs.assignments)
    first = desired_state(obs)
    looping = _applied(obs, first.assignments, prefill_0={
        "state": ProcessState.backoff, "failures_in_a_row": 2, "last_failure": "exit code 1: boom", "pid": None})
    halted = desired_state(looping, now=10.0)
    assert engines(halted.assignments) == engines(first.assignments)  # prefill-1 keeps the old spec
    assert engines(halted.assignments)[("node1", "prefill-1")] == before[("node1", "prefill-1")]
    assert halted.rollout.halted == "rollout halted: prefill-0 on node1: crash loop, last: exit code 1: boom"
    doc = cluster_document(looping, now=10.0)
    assert doc.phase == "degraded" and doc.rollout.state == "halted"
    assert doc.problems[0] == halted.rollout.halted
    assert [e.message for e in rollout_halted(None, halted.rollout.halted)] == [
        f"{halted.rollout.halted}; the engines not yet changed keep the previous spec"]
    assert rollout_halted(halted.rollout.halted, halted.rollout.halted) == []


def test_a_spawn_failure_halts_at_once():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    first = desired_state(obs)
    failed = _applied(obs, first.assignments, prefill_0={
        "state": ProcessState.backoff, "failures_in_a_row": 1, "pid": None,
        "last_failure": "spawn failed: [Errno 2] No such file or directory: 'vllmx'"})
    assert "spawn failed" in desired_state(failed).rollout.halted


def test_a_change_the_node_refused_halts_the_rollout():
    """The node checked the new spec before stopping anything: the old process still runs."""
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    before = engines(obs.assignments)
    first = desired_state(obs)
    new_hash = engines(first.assignments)[("node1", "prefill-0")]
    refused = _applied(obs, first.assignments, prefill_0={
        "spec_hash": before[("node1", "prefill-0")], "refused_spec_hash": new_hash,
        "refused": "argv[0] 'vllmx' not found on PATH"})
    decided = desired_state(refused)
    assert decided.rollout.halted == ("rollout halted: prefill-0 on node1: refused by its node: "
                                      "argv[0] 'vllmx' not found on PATH")
    assert engines(decided.assignments)[("node1", "prefill-1")] == before[("node1", "prefill-1")]


def test_a_newer_spec_replaces_a_failing_canary_at_once():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    first = desired_state(obs)
    looping = _applied(obs, first.assignments, prefill_0={
        "state": ProcessState.backoff, "failures_in_a_row": 3, "last_failure": "exit code 1", "pid": None})
    fixed = _replaced(looping, prefill={"X": "2"})
    decided = desired_state(fixed)
    assert decided.rollout.halted is None
    after = engines(decided.assignments)
    # the failing canary is down anyway: it takes the fix at once; the healthy one waits its turn
    assert after[("node1", "prefill-0")] != engines(first.assignments)[("node1", "prefill-0")]
    assert after[("node1", "prefill-1")] == engines(looping.assignments)[("node1", "prefill-1")]


def test_a_start_timeout_halts_only_when_the_time_is_known():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    first = desired_state(obs)
    slow = _applied(obs, first.assignments, prefill_0={"state": ProcessState.running, "started_at": 100.0})
    timeout = next(p for a in first.assignments.values() if a for p in a.processes if p.name == "prefill-0").start_timeout_s
    assert desired_state(slow).rollout.halted is None
    assert desired_state(slow, now=100.0 + timeout / 2).rollout.halted is None
    assert "not ready" in desired_state(slow, now=101.0 + timeout).rollout.halted


def test_a_master_restart_rolls_prefill_one_at_a_time_and_never_empties_it():
    obs = demo_running(master_pid=500)
    before = engines(obs.assignments)
    obs, history = settle(obs, {"mooncake-master": 501})  # same spec, new pid: it crashed
    assert obs.record.master_epoch == 1
    steps = [before, *history]
    for a, b in zip(steps, steps[1:], strict=False):
        prefill = {n for n in _changed(a, b) if n.startswith("prefill")}
        assert len(prefill) <= 1, "prefill one at a time"
        decode = {k for k in b if k[1].startswith("decode") and a.get(k) != b[k]}
        assert len(decode) in (0, 4), "the decode group as one unit"
    assert all(history[-1][k] != before[k] for k in before)


def test_a_replace_says_beforehand_how_long_the_decode_group_is_away():
    obs = demo_running(master_pid=500)
    statuses = {n: s.model_copy(update={"processes": [
        p.model_copy(update={"ready_after_s": 7.0 + i}) for i, p in enumerate(s.processes)]})
        for n, s in obs.statuses.items()}
    replaced = _replaced(dataclasses.replace(obs, statuses=statuses), prefill={"X": "1"}, decode={"X": "1"})
    assert change_impact(replaced) == [
        "prefill: 2 running engines change in waves, at most 1 not ready at a time",
        "decode: the DP group of 4 ranks restarts as one unit: no decode while its ranks drain (at most 60 s) and "
        "start again (about 8 s, as its slowest rank took last time)",
    ]
    assert change_impact(_replaced(obs, prefill={"X": "1"})) == [
        "prefill: 2 running engines change in waves, at most 1 not ready at a time"]


def test_plan_says_how_each_role_changes():
    obs = demo_running(master_pid=500)
    desired = desired_state(obs)
    assert how_roles_change(desired.plan, desired.spec) == [
        "prefill: 2 engines change in waves, at most 1 not ready at a time",
        "decode: one DP group of 4 ranks: a change restarts it as one unit, with no decode until every rank is "
        "ready again (a start is given up to 3600 s)",
    ]


# ---- the decode DP group is a gang ------------------------------------------------------------

def _only_node3(obs: Observed, **fields) -> Observed:
    statuses = dict(obs.statuses)
    statuses["node3"] = statuses["node3"].model_copy(update={"processes": [
        p.model_copy(update=fields) if p.name == "decode-1" else p for p in statuses["node3"].processes]})
    return dataclasses.replace(obs, statuses=statuses)


def test_a_rank_that_dies_restarts_the_whole_group_with_an_event():
    obs = demo_running(master_pid=500)
    before = engines(obs.assignments)
    assert obs.record.group_ready  # every rank was ready: the group formed
    broken = _only_node3(obs, state=ProcessState.backoff, pid=None, last_failure="killed by SIGKILL (9)",
                         last_failure_at=5.0)
    desired = desired_state(broken, now=1000.0)
    after = engines(desired.assignments)
    assert {k for k in before if after[k] != before[k]} == {k for k in before if k[1].startswith("decode")}
    assert desired.record.group_epoch == 1 and desired.record.group_since == 1000.0
    assert desired.record.group_reason == "decode-1 on node3 (rank 3) failed: killed by SIGKILL (9)"
    messages = [e.message for e in write_events(broken, desired)]
    assert "decode DP group restarted as a whole: decode-1 on node3 (rank 3) failed: killed by SIGKILL (9)" in messages
    assert desired_state(broken).record.group_epoch == 0  # without the clock: no decision that needs it


def test_group_restarts_back_off_and_reset_once_the_group_ran_long_enough():
    obs = demo_running(master_pid=500)
    record = obs.record.model_copy(update={"group_since": 1000.0, "group_restarts": 3, "group_ready": ""})
    formed = desired_state(dataclasses.replace(obs, record=record), now=1010.0).record
    assert formed.group_ready and formed.group_formed_at == 1010.0 and formed.group_restarts == 3
    settled = dataclasses.replace(obs, record=formed)
    # formed, then stable as long as a process must be (restart.reset_after_s 60) before the count resets
    assert desired_state(settled, now=1010.0 + 59).record.group_restarts == 3
    assert desired_state(settled, now=1010.0 + 61).record.group_restarts == 0
    again = settled
    broken = _only_node3(again, state=ProcessState.backoff, pid=None, last_failure="exit code 1", last_failure_at=5.0)
    wait = 1.0 * 2 ** 3  # policy.restart: initial 1 s, multiplier 2, 3 restarts in a row
    assert desired_state(broken, now=1000.0 + wait - 0.5).record.group_epoch == 0
    assert desired_state(broken, now=1000.0 + wait + 0.5).record.group_epoch == 1


def test_group_restart_rank_restarts_only_the_rank():
    obs = demo_running(master_pid=500)
    spec = {**obs.record.spec, "decode": {**obs.record.spec["decode"], "group_restart": "rank"}}
    obs = dataclasses.replace(obs, record=obs.record.model_copy(update={"spec": spec}))
    obs, _ = settle(obs, {"mooncake-master": 500})
    broken = _only_node3(obs, state=ProcessState.backoff, pid=None, last_failure="exit code 1", last_failure_at=5.0)
    assert engines(desired_state(broken, now=1e6).assignments) == engines(obs.assignments)


def test_a_rank_failing_before_the_group_formed_rejoins_on_its_own():
    """A new rank that came up while the previous group's rank 0 still ran was refused and
    exited: its agent restarts it; the group is not restarted for that."""
    obs = demo_running(master_pid=500)
    forming = dataclasses.replace(obs, record=obs.record.model_copy(update={"group_ready": ""}))
    refused = _only_node3(forming, state=ProcessState.backoff, pid=None, last_failure="exit code 1: refused",
                          last_failure_at=5.0)
    assert desired_state(refused, now=1e6).record.group_epoch == 0
    # and once formed, a failure it got over before (ready again since) is no reason either
    over = _only_node3(obs, state=ProcessState.running, last_failure="exit code 1", last_failure_at=5.0,
                       ready_again_at=6.0)
    assert desired_state(over, now=1e6).record.group_epoch == 0


def test_a_rank_alive_but_no_longer_ready_restarts_the_group():
    """Its peers died and came back fresh (their node was lost, then its agent returned): the
    survivors still run, broken, and would never rejoin; the whole group restarts."""
    obs = demo_running(master_pid=500)
    broken = _only_node3(obs, state=ProcessState.running, ready_lost_at=7.0, message="readiness probe failing (3x)")
    desired = desired_state(broken, now=1e6)
    assert desired.record.group_epoch == 1
    assert desired.record.group_reason == ("decode-1 on node3 (rank 3) no longer ready: readiness probe failing (3x)")


def test_a_crash_loop_at_rest_is_no_halt_and_holds_no_group_restart():
    """No rollout going on: an engine failing is a problem of its own, not a halted rollout;
    and a DP group restart goes through even while another engine fails."""
    obs = demo_running(master_pid=500)
    looping = _applied(obs, obs.assignments, prefill_0={
        "state": ProcessState.backoff, "failures_in_a_row": 3, "last_failure": "exit code 1", "pid": None})
    assert desired_state(looping, now=1e6).rollout.halted is None
    broken = _only_node3(looping, state=ProcessState.backoff, pid=None, last_failure="killed by SIGKILL (9)",
                         last_failure_at=5.0)
    desired = desired_state(broken, now=1e6)
    before, after = engines(obs.assignments), engines(desired.assignments)
    assert desired.record.group_epoch == 1
    assert all(after[k] != before[k] for k in before if k[1].startswith("decode"))


def test_an_engine_that_served_then_lost_readiness_is_not_a_start_timeout():
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    first = desired_state(obs)
    served = _applied(obs, first.assignments, prefill_0={"state": ProcessState.running, "started_at": 100.0,
                                                         "ready_after_s": 3.0, "ready_lost_at": 7000.0})
    assert desired_state(served, now=100.0 + 7200).rollout.halted is None


def test_a_rank_that_is_a_new_process_since_the_group_formed_restarts_the_group():
    """Its node was lost and came back: the new agent started fresh ranks there; the ranks
    elsewhere still belong to the group that formed. No failure is reported, only new pids."""
    obs = demo_running(master_pid=500)
    assert obs.record.group_pids  # which processes formed it
    old = obs.record.group_pids["node3/decode-1"]
    fresh = _only_node3(obs, state=ProcessState.running, pid=old + 1)
    desired = desired_state(fresh, now=1e6)
    assert desired.record.group_epoch == 1
    assert desired.record.group_reason == (f"decode-1 on node3 (rank 3) is a new process (pid {old} -> {old + 1}): "
                                           "it cannot rejoin the group that formed")


def test_answers_kept_per_node_between_revisions_are_the_answers_made_afresh():
    """`core.node_engines` keeps each node's answers while its keys are unchanged (and the clock
    cannot change them): a rollout step by step, with a start timeout passing, gives the same
    decisions as with nothing kept."""
    obs = _replaced(demo_running(master_pid=500), prefill={"X": "1"})
    first = desired_state(obs)
    slow = _applied(obs, first.assignments, prefill_0={"state": ProcessState.running, "started_at": 100.0})
    timeout = next(p for a in first.assignments.values() if a for p in a.processes if p.name == "prefill-0").start_timeout_s
    ready = _applied(obs, first.assignments)
    steps = [(obs, None), (slow, 100.0), (slow, 101.0 + timeout), (ready, 101.0 + timeout), (obs, 5.0)]

    def decision(o: Observed, now: float | None) -> tuple[object, ...]:
        d = desired_state(o, now)
        return d.assignments, d.record, d.rollout, cluster_document(o, now or 0.0)

    forget_kept()
    kept = [decision(o, now) for o, now in steps]
    fresh = []
    for o, now in steps:
        forget_kept()
        fresh.append(decision(o, now))
    assert kept == fresh
    assert kept[2][2].halted and not kept[1][2].halted and kept[0][2].active
