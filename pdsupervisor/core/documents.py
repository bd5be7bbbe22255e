"""The documents the cluster REST API serves, as models: one definition for the agent's routes
(which serialize them), the client and the CLI (which read them), and the OpenAPI schemas
(generated from them, see `pdsupervisor.api.openapi`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from pdsupervisor.core.etcd_members import EtcdDocument, MemberReplaced, ReplaceRequest
from pdsupervisor.core.models import NodeFacts, Role

Action = Literal["start", "stop"]
Phase = Literal["pending", "starting", "ready", "updating", "degraded", "stopping", "stopped"]


class Document(BaseModel):
    """A document of the API. Fields it does not know are ignored, not refused: a CLI of
    the previous release keeps reading the documents of agents already upgraded."""

    model_config = ConfigDict(extra="ignore")


class ProcessRow(Document):
    """One process of `GET /cluster`: what is assigned (or planned), and what its agent reports."""

    node: str
    name: str = Field(examples=["decode-3"])
    role: Role
    state: str = Field(
        examples=["ready"],
        description="starting, running, ready, backoff, stopping, exited, failed (with ' (old spec)' while "
                    "the process still runs a previous spec); pending/waiting before the agent reports; "
                    "crash-looping while it failed twice or more in a row and is not ready (`last_failure` says why); "
                    "lost when the node's lease expired; unmanaged while its lease is expired but "
                    "its engines still answer (they keep serving, the node is not replaced)",
    )
    pid: int | None
    restarts: int
    last_exit_code: int | None
    started_at: float | None = Field(description="wall clock, seconds since the epoch")
    endpoint: str | None = Field(examples=["10.0.0.2:8200"])
    dp_rank: int | None
    last_failure: str | None = Field(None, description="why it last failed, while it fails in a row "
                                     "(`exit code 1: RuntimeError: ...`, `spawn failed: ...`)")


class RolloutRole(Document):
    """One role's part of a rollout."""

    role: str = Field(examples=["prefill"])
    total: int = Field(description="engines of the role in the plan")
    updated: int = Field(description="engines assigned their new spec")
    unavailable: int = Field(description="engines not ready with what they are assigned")
    max_unavailable: int = Field(description="policy.rollout: engines of the role that may be not ready at once")
    group: bool = Field(description="a decode DP group: its ranks change together, in one wave")


class RolloutDocument(Document):
    """Running engines changing to a new spec (or to a new Mooncake master epoch), in waves."""

    state: Literal["updating", "halted"]
    reason: str | None = Field(None, description="why it halted: the engine that failed with its new spec, and how")
    roles: list[RolloutRole]


class ClusterDocument(Document):
    """`GET /cluster` (and `pdsupervisor status -o json`): phase, what is missing, every process."""

    cluster: str | None
    generation: int
    action: Action | None
    phase: Phase
    leader: str | None
    missing: list[str] = Field(description="what the plan lacks, e.g. 'decode.node_names: node g14 is not registered'")
    problems: list[str] = Field(description="processes in backoff/exited/failed, not ready after their "
                                            "start_timeout_s, or no longer ready after being ready (not those "
                                            "the agent stops on purpose); the cluster past policy.start_timeout_s")
    start_timed_out: bool = Field(description="still pending/starting after policy.start_timeout_s")
    members: list[str]
    placement: dict[str, list[str]] = Field(description="role -> nodes (decode in DP-index order; 'spare')")
    proxy_url: str | None
    processes: list[ProcessRow]
    rollout: RolloutDocument | None = Field(None, description="engines changing in waves; absent when none are")


class NodesDocument(Document):
    """`GET /nodes`: the registered members by name, and the coordinator."""

    leader: str | None
    nodes: list[NodeFacts]


class Event(BaseModel):
    """One event for people; some kinds carry more fields (node, role, generation, placement...)."""

    model_config = ConfigDict(extra="allow")

    ts: float = Field(description="wall clock, seconds since the epoch")
    kind: str = Field(examples=["member"])
    message: str


class EventsDocument(Document):
    """`GET /events`: the newest events, oldest first."""

    events: list[Event]


class SubmitAnswer(Document):
    """`POST /cluster/start` and `/cluster/stop` accepted (202)."""

    generation: int
    message: str
    impact: list[str] = Field(default_factory=list, description="what the change does to serving, said beforehand: "
                              "how running engines change, and how long a decode DP group is away")


class FieldProblem(Document):
    field: str = Field(examples=["decode.tp"])
    message: str


def _left_out(schema: JsonDict) -> None:
    schema.pop("default", None)  # None is never served: the key is left out


class ErrorBody(Document):
    """Every error answer: `error` always; an invalid spec lists its `problems`; a refused
    submit (409) says which `generation` runs. Keys that do not apply are left out."""

    error: str
    generation: int | SkipJsonSchema[None] = Field(None, json_schema_extra=_left_out)
    message: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_left_out)
    problems: list[FieldProblem] | SkipJsonSchema[None] = Field(None, json_schema_extra=_left_out)

    def served(self) -> dict[str, object]:
        """The JSON object to answer with: without the keys that do not apply."""
        return self.model_dump(mode="json", exclude_none=True)


# Every document above (and etcd's, from etcd_members), as the OpenAPI description lists them.
DOCUMENTS: tuple[type[BaseModel], ...] = (
    ClusterDocument, NodesDocument, EventsDocument, SubmitAnswer, ErrorBody, EtcdDocument, MemberReplaced,
    ReplaceRequest,  # a request body
)


def nodes_document(members: Mapping[str, NodeFacts], leader: str | None) -> NodesDocument:
    return NodesDocument(leader=leader, nodes=[m for _, m in sorted(members.items())])
