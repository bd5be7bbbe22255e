"""What the cluster's keys held at one store revision (`Observed`), and the questions every
reader asks of it: which statuses are current, what a process is doing, what is assigned.

Shared by the cluster view, the rollout, the events and the store (which builds `Observed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import Field

from pdsupervisor.core.documents import Action
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessSpec, ProcessState, ProcessStatus, Strict


class SpecRecord(Strict):
    """`/pdsupervisor/<cluster>/spec`: the submitted spec, what to do with it, and where it landed."""

    generation: int
    action: Action = "start"
    spec: dict[str, Any]
    placement: dict[str, list[str]] = Field(default_factory=dict)
    submitted_at: float = 0.0
    # The Mooncake master's pid the engines last started against, and how many times the
    # engines were restarted because the master restarted (its metadata does not survive).
    master_pid: int | None = None
    master_epoch: int = 0
    # Nodes whose agent is away (member key expired) while an engine assigned to them still
    # answered the coordinator within `policy.node_loss_grace_s`: not lost, not replaced.
    unmanaged: list[str] = Field(default_factory=list)
    # Nodes whose agent is away and none of whose engines answers, lost less than
    # `policy.node_loss_grace_s` ago: not replaced yet either (a busy engine may answer again).
    recently_lost: list[str] = Field(default_factory=list)
    # The decode DP group restarted as a whole (`decode.group_restart: group`): how many times
    # (in every rank's spec), when last (coordinator's wall clock), how many times in a row
    # without the group getting ready (the backoff), and why.
    group_epoch: int = 0
    group_since: float = 0.0
    group_restarts: int = 0
    group_reason: str | None = None
    # the ranks' spec hashes (a digest) with which every rank was last ready: the group formed.
    # A rank's failure restarts the group only once it formed (see `cluster_view.group_restart`).
    group_ready: str = ""
    group_pids: dict[str, int] = Field(default_factory=dict)  # `node/process` -> pid of each rank that formed it
    group_formed_at: float = 0.0  # coordinator's wall clock: when it formed (restart count reset after reset_after_s)


@dataclass(frozen=True)
class Observed:
    """The cluster's keys as they were at one store revision (one read, like Patroni's
    `Cluster`): what is decided from it is decided from a state that existed."""

    record: SpecRecord | None
    members: dict[str, NodeFacts]
    assignments: dict[str, NodeAssignment]
    statuses: dict[str, NodeStatus]
    record_revision: int = 0  # mod revision of the spec record (0: absent), for a CAS on it
    revision: int = 0  # the store revision every part was read at (0: not read from etcd)
    leader: str | None = None  # the coordinator holding the leader key at that revision

    # Indexes every reader asks of again and again (per process, per cycle): built once per
    # observation (frozen, and its dicts are never changed in place), so a question about one
    # process costs a dict lookup, not a scan of the node's statuses.
    @cached_property
    def live(self) -> dict[str, NodeStatus]:
        """The statuses written by the agent that holds the node's member key now."""
        return {n: s for n, s in self.statuses.items() if s.current_for(self.members.get(n))}

    @cached_property
    def processes(self) -> dict[tuple[str, str], ProcessStatus]:
        """What each live agent reports, by (node, process)."""
        out: dict[tuple[str, str], ProcessStatus] = {}
        for n, s in self.live.items():
            for p in s.processes:
                out.setdefault((n, p.name), p)  # the first of a name, as a scan would find
        return out

    @cached_property
    def assigned(self) -> dict[tuple[str, str], ProcessSpec]:
        """What each node is assigned, by (node, process)."""
        out: dict[tuple[str, str], ProcessSpec] = {}
        for n, a in self.assignments.items():
            for p in a.processes:
                out.setdefault((n, p.name), p)
        return out


def live_status(obs: Observed, node: str) -> NodeStatus | None:
    """The node's status, if its agent is registered and wrote it since registering."""
    return obs.live.get(node)


def live_statuses(obs: Observed) -> dict[str, NodeStatus]:
    return dict(obs.live)


def observed_process(obs: Observed, node: str, name: str) -> ProcessStatus | None:
    return obs.processes.get((node, name))


def is_ready(obs: Observed, node: str, proc: ProcessSpec) -> bool:
    """Ready, on a live member (see `live_status`), running exactly this spec."""
    return ready_running(obs.processes.get((node, proc.name)), proc)


def ready_running(seen: ProcessStatus | None, proc: ProcessSpec) -> bool:
    """What it reports (`seen`) is ready and running exactly this spec."""
    return seen is not None and seen.state == ProcessState.ready and seen.spec_hash == proc.spec_hash()


def assigned_spec(obs: Observed, node: str, name: str) -> ProcessSpec | None:
    return obs.assigned.get((node, name))


def assigned_roles(obs: Observed) -> set[str]:
    return {p.role for p in obs.assigned.values()}
