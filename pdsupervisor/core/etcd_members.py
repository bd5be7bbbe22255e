"""The health of etcd's own members (`GET /etcd`, `pdsupervisor status`), and when replacing
one is safe. Pure: the store reads the member list and each member's status into these.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Document(BaseModel):
    """As `documents.Document` (which lists these): unknown fields ignored, for older CLIs."""

    model_config = ConfigDict(extra="ignore")


class EtcdMember(Document):
    """One etcd member: from the member list, and what its own status endpoint answered."""

    name: str = Field(description="empty for a member added but not started yet")
    id: str = Field(description="etcd's member ID, hexadecimal")
    peer_urls: list[str] = Field(default_factory=list)
    client_urls: list[str] = Field(default_factory=list)
    up: bool = Field(description="its client URL answered a status request")
    is_leader: bool = False
    is_learner: bool = False
    db_size: int | None = Field(None, description="bytes of its backend database")
    raft_term: int | None = None
    raft_index: int | None = None
    version: str | None = None
    errors: list[str] = Field(default_factory=list, description="why it is not up, or etcd's own alarms")


class EtcdDocument(Document):
    """`GET /etcd`: every member, the raft leader, and whether a quorum is up."""

    members: list[EtcdMember]
    leader: str | None = Field(None, description="the raft leader's member name (None: no leader)")
    up: int = Field(description="members up")
    quorum: int = Field(description="members needed for a quorum (a majority)")

    @property
    def has_quorum(self) -> bool:
        return self.leader is not None and self.up >= self.quorum

    def summary(self) -> str:
        """One line: `etcd: 3/3 members up, leader node1, db 1.2 MiB`, then whatever is down."""
        sizes = [m.db_size for m in self.members if m.up and m.db_size is not None]
        line = f"etcd: {self.up}/{len(self.members)} members up, " + (
            f"leader {self.leader}" if self.leader else "NO LEADER (no quorum: nothing can change)")
        if sizes:
            line += f", db {max(sizes) / 2**20:.1f} MiB"
        down = [f"{m.name or m.id} ({'; '.join(m.errors) or 'down'})" for m in self.members if not m.up]
        return line + (f"; down: {', '.join(down)}" if down else "")


class ReplaceRequest(BaseModel):
    """`POST /etcd/replace-member`: remove the dead member `name`, add one at `peer_url`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)
    peer_url: str = Field(pattern=r"^https?://[^\s/,=]+:[0-9]{1,5}$", examples=["https://10.0.0.4:2380"])
    new_name: str | None = Field(None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="the new member's (node's) name; default: `name`")


class MemberReplaced(Document):
    """The answer of `POST /etcd/replace-member`: what was done, and the member list the new
    member's agent must start with (`bootstrap_etcd.members`, `initial_cluster_state: existing`)."""

    removed_id: str
    added_id: str
    name: str
    peer_url: str
    members: dict[str, str] = Field(description="every member's name -> peer URL, the new one included")


def quorum(members: int) -> int:
    return members // 2 + 1


def member_document(members: list[EtcdMember]) -> EtcdDocument:
    """The document of these members (the leader is the one whose own status says so)."""
    leaders = [m.name or m.id for m in members if m.up and m.is_leader]
    return EtcdDocument(members=sorted(members, key=lambda m: (m.name or "~", m.id)),
                        leader=leaders[0] if leaders else None, up=sum(m.up for m in members),
                        quorum=quorum(len(members)))


def replacement_problem(doc: EtcdDocument, name: str, new_peer_url: str, new_name: str | None = None) -> str | None:
    """Why member `name` must not be replaced by a new member `new_name` (default `name`) at
    `new_peer_url` now; None when it is safe: `name` is a member and down, and a quorum is up
    with a leader. The members up then keep a quorum once it is removed (fewer members) and
    once the new, not yet started, member is added (as many as now). The new name must be no
    other member's: the member list handed to its agent would hold one name twice."""
    found = [m for m in doc.members if m.name == name]
    if not found:
        return f"no etcd member is named {name!r} (members: {', '.join(m.name or m.id for m in doc.members)})"
    if found[0].up:
        return f"member {name} is up: replace only a dead member (stop it first if you mean to move it)"
    if not doc.has_quorum:
        return (f"etcd has no quorum ({doc.up} of {len(doc.members)} members up, leader {doc.leader or 'none'}): "
                "a member cannot be removed or added until a majority is back")
    unstarted = [m.id for m in doc.members if not m.name]
    if unstarted:  # added (by an earlier replacement) but never started: finish that one first
        return (f"member {unstarted[0]} was added but has not started yet (it has no name): start its node's "
                "agent, or remove it with `etcdctl member remove`, before replacing another")
    taken = [m.name or m.id for m in doc.members if m.name != name and new_peer_url in m.peer_urls]
    if taken:
        return f"{new_peer_url} is already the peer URL of member {taken[0]}"
    if new_name is not None and new_name != name and any(m.name == new_name for m in doc.members):
        return f"{new_name} is already the name of another etcd member: give a new_name no member has"
    shapes = {_scheme_port(u) for m in doc.members if m.name != name for u in m.peer_urls}
    if len(shapes) == 1 and _scheme_port(new_peer_url) not in shapes:
        scheme, port = next(iter(shapes))
        return (f"{new_peer_url}: every other member's peer URL is {scheme}://<host>:{port}, and the new member's "
                f"agent runs it the same way (bootstrap_etcd.peer_port, the members' TLS): give "
                f"{scheme}://<its address>:{port}")
    return None


def _scheme_port(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    return scheme.lower(), rest.rstrip("/").rpartition(":")[2]
