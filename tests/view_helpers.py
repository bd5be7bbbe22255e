"""A cluster seen through pure observations: the demo spec planned on three members, and
agents that run whatever they are assigned (each process ready), for the pure view tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from pdsupervisor.core.cluster_view import desired_state
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessState, ProcessStatus
from pdsupervisor.core.observed import Observed, SpecRecord
from pdsupervisor.core.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]


def demo_spec(master_port: int, decode_slots: int | None = None) -> dict:
    spec = yaml.safe_load((ROOT / "etc/pdsupervisor/demo.yaml").read_text())
    spec["mooncake"]["port"] = master_port
    if decode_slots is not None:
        spec["decode"]["slots"] = decode_slots
    return validate_spec(spec).model_dump(mode="json")


def running(obs: Observed, assignments: dict[str, NodeAssignment], pids: dict[str, int]) -> Observed:
    """`obs` once every agent runs its assignment and reports each process ready."""
    statuses = {
        node: NodeStatus(node=node, updated_at=1.0, lease=obs.members[node].lease, processes=[
            ProcessStatus(name=p.name, role=p.role, state=ProcessState.ready, pid=pids.get(p.name, 1000 + i),
                          spec_hash=p.spec_hash())
            for i, p in enumerate(a.processes)
        ])
        for node, a in assignments.items() if a is not None
    }
    return dataclasses.replace(obs, assignments={n: a for n, a in assignments.items() if a}, statuses=statuses)


def engines(assignments: dict[str, NodeAssignment | None]) -> dict[tuple[str, str], str]:
    return {(n, p.name): p.spec_hash() for n, a in assignments.items() if a for p in a.processes
            if p.role in ("prefill", "decode")}


def settle(obs: Observed, pids: dict[str, int]) -> tuple[Observed, list[dict[tuple[str, str], str]]]:
    """Apply desired states until they stop changing; the engines' spec hashes at each step."""
    history: list[dict[tuple[str, str], str]] = []
    for _ in range(20):
        desired = desired_state(obs)
        obs = running(dataclasses.replace(obs, record=desired.record), desired.assignments, pids)
        history.append(engines(desired.assignments))
        if len(history) > 1 and history[-1] == history[-2] and desired.record == obs.record:
            break
    return obs, history


def demo_running(master_pid: int) -> Observed:
    """The demo spec on its three nodes, every process ready, the master with `master_pid`."""
    members = {f"node{i}": NodeFacts(name=f"node{i}", ip=f"127.0.0.{i}", lease=i, state_dir=f"/tmp/n{i}")
               for i in (1, 2, 3)}
    obs = Observed(record=SpecRecord(generation=1, spec=demo_spec(50001)), members=members,
                   assignments={}, statuses={})
    return settle(obs, {"mooncake-master": master_pid})[0]
