"""The plan memo: a status change re-plans nothing; a change of any plan input re-plans."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from pdsupervisor.core import cluster_view
from pdsupervisor.core.cluster_view import desired_state, try_plan
from pdsupervisor.core.models import NodeFacts, NodeStatus
from pdsupervisor.core.observed import Observed, SpecRecord
from pdsupervisor.core.plan_memo import PlanInputs, PlanMemo
from tests.view_helpers import demo_running, demo_spec

# SpecRecord fields the planner does not read (each checked below to leave the plan alone);
# every other field must be in PlanInputs.
NOT_PLAN_INPUTS = {"action", "submitted_at", "master_pid", "group_since", "group_restarts", "group_reason",
                   "group_ready", "group_pids", "group_formed_at"}
OTHER_VALUES = {"action": "stop", "submitted_at": 99.0, "master_pid": 4321, "group_since": 5.0,
                "group_restarts": 3, "group_reason": "why", "group_ready": "abc", "group_pids": {"node2/decode-0": 7},
                "group_formed_at": 6.0}


def _members(*names: str) -> dict[str, NodeFacts]:
    return {n: NodeFacts(name=n, ip=f"127.0.0.{n[-1]}", lease=int(n[-1]), state_dir=f"/tmp/{n}") for n in names}


def _obs(**record: object) -> Observed:
    spec = demo_spec(50001)
    spec["policy"]["node_loss"] = "replace"
    return Observed(record=SpecRecord(generation=1, spec=spec, **record),  # type: ignore[arg-type]
                    members=_members("node1", "node2", "node3", "node4"), assignments={}, statuses={})


def _fresh(obs: Observed) -> tuple[object, ...]:
    assert obs.record is not None
    return cluster_view._plan(obs.record, obs.members)


def _record(obs: Observed, **update: object) -> Observed:
    assert obs.record is not None
    return dataclasses.replace(obs, record=obs.record.model_copy(update=update))


def _spec(obs: Observed, change: Callable[[dict], None]) -> Observed:
    assert obs.record is not None
    spec = dict(obs.record.spec)
    change(spec)
    return _record(obs, spec=spec)


def _member(obs: Observed, name: str, **update: object) -> Observed:
    return dataclasses.replace(obs, members={**obs.members, name: obs.members[name].model_copy(update=update)})


def _without(obs: Observed, name: str) -> Observed:
    return dataclasses.replace(obs, members={n: f for n, f in obs.members.items() if n != name})


LOST = {"placement": {"prefill": ["node1"], "decode": ["node2", "node3"], "spare": ["node4"]}}
CHANGES: dict[str, tuple[Callable[[], Observed], Callable[[Observed], Observed]]] = {
    "spec": (_obs, lambda o: _spec(o, lambda s: s.update(model="other-model"))),
    "placement": (_obs, lambda o: _record(o, placement={"prefill": ["node1"], "decode": ["node3", "node2"]})),
    "generation": (_obs, lambda o: _record(o, generation=2)),
    "master_epoch": (_obs, lambda o: _record(o, master_epoch=1)),
    "group_epoch": (_obs, lambda o: _record(o, group_epoch=1)),
    "unmanaged": (lambda: _without(_obs(**LOST), "node3"), lambda o: _record(o, unmanaged=["node3"])),
    "recently_lost": (lambda: _without(_obs(**LOST), "node3"), lambda o: _record(o, recently_lost=["node3"])),
    "a member joins": (lambda: _without(_obs(), "node4"), lambda o: _obs()),
    "a member leaves": (_obs, lambda o: _without(o, "node4")),
    "a member's ip": (_obs, lambda o: _member(o, "node2", ip="127.0.0.9")),
    "a member's state_dir": (_obs, lambda o: _member(o, "node2", state_dir="/srv/x")),
    "a member's python": (_obs, lambda o: _member(o, "node1", python="/opt/py/bin/python3")),
}


@pytest.mark.parametrize("what", list(CHANGES))
def test_a_change_of_a_plan_input_re_plans(what: str):
    """Each input of the plan, changed: the memo answers the fresh plan (which differs, so a
    stale answer would fail here), not the one it kept."""
    make, change = CHANGES[what]
    before = make()
    first = try_plan(before)
    assert first == _fresh(before) and try_plan(before)[1] is first[1]  # kept
    after = change(before)
    assert _fresh(after) != _fresh(before), "the change must matter to the planner"
    assert try_plan(after) == _fresh(after)


def test_a_status_change_re_plans_nothing():
    obs = demo_running(master_pid=500)
    plan = try_plan(obs)[1]
    assert plan is not None
    node = next(iter(obs.statuses))
    fresh = NodeStatus.model_validate_json(obs.statuses[node].model_dump_json())
    later = dataclasses.replace(obs, statuses={**obs.statuses, node: fresh.model_copy(update={"updated_at": 9.0})},
                                revision=obs.revision + 1)
    # the members decoded anew (as every read of etcd gives): equal, not the same objects
    later = dataclasses.replace(later, members={n: NodeFacts.model_validate_json(f.model_dump_json())
                                                for n, f in later.members.items()})
    misses = cluster_view.PLANS.misses
    assert try_plan(later)[1] is plan
    assert desired_state(later).plan is plan
    assert cluster_view.PLANS.misses == misses


def test_every_record_field_is_a_plan_input_or_leaves_the_plan_alone():
    """A new SpecRecord field must be classified here: in PlanInputs, or shown not read."""
    inputs = {f.name for f in dataclasses.fields(PlanInputs)} - {"members"}
    assert set(SpecRecord.model_fields) == inputs | NOT_PLAN_INPUTS
    obs = _obs()
    for name in NOT_PLAN_INPUTS:
        assert _fresh(_record(obs, **{name: OTHER_VALUES[name]})) == _fresh(obs), name


def test_the_memo_keeps_the_most_recent_few():
    memo: PlanMemo[int] = PlanMemo(size=2)
    obs = _obs()
    keys = [cluster_view.plan_inputs(_record(obs, generation=g).record, obs.members) for g in (1, 2, 3)]  # type: ignore[arg-type]
    computed: list[int] = []

    def compute(g: int) -> Callable[[], int]:
        return lambda: computed.append(g) or g

    assert [memo.get(k, compute(g)) for g, k in zip((1, 2, 1), (keys[0], keys[1], keys[0]), strict=True)] == [1, 2, 1]
    assert computed == [1, 2]
    memo.get(keys[2], compute(3))  # evicts the least recently used: 2
    assert memo.get(keys[0], compute(1)) == 1 and memo.get(keys[1], compute(2)) == 2
    assert computed == [1, 2, 3, 2]
    with pytest.raises(ValueError, match="size must be at least 1"):
        PlanMemo(size=0)


@pytest.mark.parametrize("what", list(CHANGES))
def test_planning_again_from_the_placement_planned_gives_the_same_plan(what: str):
    """What lets `try_plan` keep a plan for the placement it records next: `place` keeps every
    registered previous node in its slot."""
    for obs in (CHANGES[what][0](), CHANGES[what][1](CHANGES[what][0]())):
        first = _fresh(obs)
        plan = first[1]
        if plan is not None:
            assert _fresh(_record(obs, placement=plan.placement)) == first


def test_the_placement_recorded_next_re_plans_nothing():
    obs = _record(_obs(), generation=7)  # inputs no other test planned
    plan = try_plan(obs)[1]
    assert plan is not None and obs.record is not None and obs.record.placement == {}
    misses = cluster_view.PLANS.misses
    recorded = _record(obs, placement=plan.placement)  # what the coordinator writes, read back
    assert try_plan(recorded)[1] is plan and cluster_view.PLANS.misses == misses
