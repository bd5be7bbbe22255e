"""etcd's member health, read from the cluster: its member list, then every member's own
status at its client URL, all at once (a dead member costs one short timeout, not one each)."""

from __future__ import annotations

import asyncio
from typing import Any

from pdsupervisor.core.etcd_members import (
    EtcdDocument,
    EtcdMember,
    MemberReplaced,
    ReplaceRequest,
    member_document,
    replacement_problem,
)
from pdsupervisor.store.etcd import Store, StoreUnavailable

STATUS_TIMEOUT_S = 1.0


def _hex(value: Any) -> str:
    """etcd's uint64 member IDs, which the gateway writes as decimal strings, in hex (etcdctl's way)."""
    return format(int(value or 0), "x")


async def _member(store: Store, raw: dict[str, Any], timeout_s: float) -> EtcdMember:
    mid = _hex(raw.get("ID"))
    clients = list(raw.get("clientURLs") or [])
    base = {"name": raw.get("name") or "", "id": mid, "peer_urls": list(raw.get("peerURLs") or []),
            "client_urls": clients, "is_learner": bool(raw.get("isLearner"))}
    if not clients:
        return EtcdMember(**base, up=False, errors=["not started yet (added, never joined)"])
    try:
        st = await store.member_status(clients[0], timeout_s)
    except StoreUnavailable as exc:
        return EtcdMember(**base, up=False, errors=[str(exc)])
    return EtcdMember(
        **base, up=True, is_leader=_hex(st.get("leader")) == mid,
        db_size=int(st.get("dbSize") or 0), raft_term=int(st.get("raftTerm") or 0),
        raft_index=int(st.get("raftIndex") or 0), version=st.get("version"), errors=list(st.get("errors") or []),
    )


async def etcd_health(store: Store, timeout_s: float = STATUS_TIMEOUT_S) -> EtcdDocument:
    """Every member and whether it answers; StoreUnavailable when no endpoint gives the list.
    The list comes from the first endpoint that answers within `timeout_s`: a hung member (or
    one cut off from the others) costs that much, not the store's whole timeout."""
    errors = []
    for url in store.endpoints:
        try:
            raw = await store.member_list(url, timeout_s)
            break
        except StoreUnavailable as exc:
            errors.append(str(exc))
    else:
        raise StoreUnavailable(f"no etcd endpoint gave its member list: {'; '.join(errors)}")
    return member_document(list(await asyncio.gather(*(_member(store, m, timeout_s) for m in raw))))


class ReplaceRefused(Exception):
    """Replacing the member is not safe now (`replacement_problem` says why); nothing changed."""


async def replace_member(store: Store, req: ReplaceRequest) -> MemberReplaced:
    """Remove the dead member `req.name` and add a new one at `req.peer_url`, only when
    `replacement_problem` finds nothing against it (read just before: etcd's own strict
    reconfiguration check refuses a change that would lose the quorum, too)."""
    doc = await etcd_health(store)
    if problem := replacement_problem(doc, req.name, req.peer_url, req.new_name):
        raise ReplaceRefused(problem)
    old = next(m for m in doc.members if m.name == req.name)
    try:
        await store.member_remove(int(old.id, 16))
    except StoreUnavailable as exc:  # the removal may have been applied all the same
        raise StoreUnavailable(f"removing member {req.name} ({old.id}) got no answer ({exc}): it may have been "
                               "removed; check with `pdsupervisor etcd members` before trying again") from exc
    try:
        added = await store.member_add([req.peer_url])
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"member {req.name} ({old.id}) was removed, but adding {req.peer_url} failed: {exc}; "
                               f"add it with `etcdctl member add {req.new_name or req.name} "
                               f"--peer-urls {req.peer_url}`") from exc
    members = {m.name: m.peer_urls[0] for m in doc.members if m.name != req.name and m.peer_urls}
    name = req.new_name or req.name
    members[name] = req.peer_url
    return MemberReplaced(removed_id=old.id, added_id=_hex(added.get("ID")), name=name, peer_url=req.peer_url,
                          members=members)
