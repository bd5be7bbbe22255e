"""Every etcd call of pdsupervisor lives here, so the client library can be swapped.

The keys it reads and writes are laid out in `pdsupervisor.store.keys`; how the gateway
spells requests and answers is in `pdsupervisor.store.gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiohttp
from pydantic import BaseModel

from pdsupervisor.core.etcd_access import endpoint_url
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus
from pdsupervisor.store.errors import EtcdError as EtcdError  # re-exported: callers catch them from here
from pdsupervisor.store.errors import RequestTooLarge as RequestTooLarge
from pdsupervisor.store.errors import StoreUnavailable as StoreUnavailable
from pdsupervisor.store.errors import TlsRefused as TlsRefused
from pdsupervisor.store.errors import TokenRejected
from pdsupervisor.store.errors import WatchLost as WatchLost
from pdsupervisor.store.gateway import KeyValue as KeyValue  # re-exported (as are these three and Keys): Store returns them
from pdsupervisor.store.gateway import ServerVersion as ServerVersion
from pdsupervisor.store.gateway import WatchEvent as WatchEvent
from pdsupervisor.store.gateway import (
    b64,
    compare_mod,
    compare_value,
    decode_kv,
    decode_models,
    error_text,
    header_revision,
    json_stream,
    op_chunks,
    prefix_end,
    prefix_range,
    put_request,
    server_version,
    too_large,
    unb64,
    watch_message,
)
from pdsupervisor.store.keys import Keys as Keys
from pdsupervisor.store.transport import Credentials, TokenAuth, tls_refusal, token_rejected

M = TypeVar("M", bound=BaseModel)


# What the transport raises when etcd is unreachable, slow or cut off mid-answer.
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)

DEFAULT_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 1.0  # a live etcd's kernel answers a SYN in well under this
WATCH_IDLE_S = 30.0
EVENTS_KEPT = 500
# clientv3's `WithRequireLeader` through the gateway (gRPC metadata `hasleader: true`): etcd
# ends such a watch once its member has had no leader for ~3 election timeouts, and refuses to
# open one there. Without it a watch on a member cut off from the quorum stays open and silent
# for ever (re-opened after `idle_s` on the same member): its reader never learns it is stale.
REQUIRE_LEADER = {"Grpc-Metadata-Hasleader": "true"}
NO_LEADER = "no leader"  # in etcd's answer from a member without a leader ("etcdserver: no leader")
PAGE_KEYS = 64  # keys per page of a paged read: 64 assignments of 8 engines stay far under the gateway's 2 MiB


def lease_refresh_interval(ttl: float) -> float:
    """How often a lease holder refreshes: three tries per TTL (Patroni's loop_wait)."""
    return max(0.5, ttl / 3)


LeaderWrite = Literal["written", "changed", "deposed"]
# One fenced leader txn at most (see `Store.write_as_leader`): half of etcd's default 128
# operations, a third of its 1.5 MiB request limit (base64 in JSON grows it by a third).
TXN_MAX_OPS = 64
TXN_MAX_BYTES = 512 * 1024
TXN_PARALLEL = 2  # leader txns in flight at once: 1 MiB at most (more timed out on a busy etcd: 3 s a request)


@dataclass(frozen=True)
class LeaderWriteResult:
    """How a fenced leader write ended, and how much of it etcd took before that."""

    outcome: LeaderWrite
    written: int  # keys put or deleted (all of them when "written")
    txns: int  # transactions etcd applied
# Told of every request's (path, seconds, answered): `answered` is False when etcd did not
# answer (StoreUnavailable), True for an answer, an error answer too. Metrics hook here.
RequestObserver = Callable[[str, float, bool], None]


def _writes_any(chunk: Sequence[tuple[str, bytes | None]], keys: Mapping[str, int]) -> bool:
    return any(k in keys for k, _ in chunk)


def _dump(model: BaseModel | Mapping[str, Any]) -> bytes:
    if isinstance(model, BaseModel):
        return model.model_dump_json().encode()
    return json.dumps(model, sort_keys=True).encode()


class Store:
    """One cluster's view of etcd: typed reads and writes, leases, fenced leader writes.

    It speaks etcd's v3 JSON gateway (served on the client port) over aiohttp, which the
    agent already carries for its REST API: no gRPC stack in a daemon that sits on every
    node. Endpoints are tried in turn when one refuses connections.
    """

    def __init__(self, endpoints: list[str], cluster: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 tls: ssl.SSLContext | None = None, auth: Credentials | None = None,
                 on_request: RequestObserver | None = None):
        """`tls`: how to verify etcd and which client certificate to show (`transport.
        client_ssl_context`); endpoints without a scheme are then https. `auth`: etcd RBAC.
        `on_request` (also settable later): told of every request, not of watch streams;
        it must be quick and must not raise."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [endpoint_url(e, tls=tls is not None) for e in endpoints]
        self.cluster = cluster
        self.keys = Keys(cluster)
        self.timeout_s = timeout_s
        self._tls = tls
        self._auth = TokenAuth(auth) if auth else None
        self._session: aiohttp.ClientSession | None = None
        self._current = 0  # index of the endpoint that answered last
        self.on_request = on_request
        # the store revision of this client's last write that changed something (or may have:
        # a lease revoked): a reader fed by a watch (`ClusterCache`) has seen our own writes
        # once it reached it
        self.written_revision = 0

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the HTTP session (no request is made: etcd may come up later)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ssl=self._tls or True),
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":")),
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ---- transport -------------------------------------------------------------------

    def _endpoint_order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    async def _open(self, path: str, body: Mapping[str, Any], *, idle_s: float | None = None,
                    require_leader: bool = False) -> aiohttp.ClientResponse:
        """`_send` with the RBAC token, if any; authenticated again once if etcd rejects it."""
        if self._auth is None:
            return await self._send(path, body, idle_s, None, require_leader=require_leader)
        headers = await self._auth.header(self._authenticate)
        try:
            return await self._send(path, body, idle_s, headers, require_leader=require_leader)
        except TokenRejected:
            return await self._send(path, body, idle_s, await self._auth.header(self._authenticate, stale=headers),
                                    require_leader=require_leader)

    async def _authenticate(self, creds: Credentials) -> str:
        out = await self._json(await self._send(
            "/v3/auth/authenticate", {"name": creds.username, "password": creds.password}, None, None))
        if not out.get("token"):
            raise EtcdError(f"etcd gave no token to user {creds.username} (is its auth enabled?)")
        return str(out["token"])

    async def _send(self, path: str, body: Mapping[str, Any] | None, idle_s: float | None,
                    headers: Mapping[str, str] | None, *, require_leader: bool = False) -> aiohttp.ClientResponse:
        """POST `body` (GET without one) to the first endpoint that takes the connection; the
        caller reads and releases.

        An endpoint that refuses, or does not accept within the connect timeout (a dead
        host drops SYNs), is skipped for the next: nothing was sent to it. A request
        (`idle_s` None) has `timeout_s` in all; a stream fails after `idle_s` of silence.
        A failed TLS handshake is TlsRefused, saying which side refused. An endpoint that took
        the request but did not answer in time fails it, and the next request starts at the next.
        `require_leader`: etcd refuses (or later ends) it on a member without a leader (`REQUIRE_LEADER`).
        """
        await self.connect()
        assert self._session is not None
        connect_s = min(CONNECT_TIMEOUT_S, self.timeout_s)
        timeout = (aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=connect_s) if idle_s is None
                   else aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=idle_s))
        sent = {**(headers or {}), **REQUIRE_LEADER} if require_leader else headers
        error: BaseException | None = None
        failed_at = ""
        for i in self._endpoint_order():
            try:
                resp = await self._session.request("GET" if body is None else "POST", self.endpoints[i] + path,
                                                   json=body, timeout=timeout, headers=sent)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                error, failed_at = exc, self.endpoints[i]
                continue
            except _TRANSPORT_ERRORS as exc:
                if refusal := tls_refusal(exc):
                    raise TlsRefused(f"etcd at {self.endpoints[i]}: {refusal}") from exc
                # Taken but not answered (a member cut off from the quorum, a hung process): the
                # request may have been applied, so it is not sent again; the next one goes on
                # to the next endpoint instead of waiting on this one for ever.
                self._current = (i + 1) % len(self.endpoints)
                raise StoreUnavailable(f"etcd at {self.endpoints[i]}: {str(exc) or type(exc).__name__}") from exc
            self._current = i
            if resp.status != 200:
                try:
                    answer = await resp.read()
                except _TRANSPORT_ERRORS as exc:
                    raise StoreUnavailable(f"etcd error answer cut off: {str(exc) or type(exc).__name__}") from exc
                finally:
                    resp.release()
                if headers is not None and token_rejected(resp.status, answer):
                    raise TokenRejected(error_text(answer, resp.status))
                text = error_text(answer, resp.status)
                if NO_LEADER in text:  # a member cut off from the quorum: the next request asks another
                    self._current = (i + 1) % len(self.endpoints)
                raise EtcdError(text)
            return resp
        if refusal := tls_refusal(error):  # at the last endpoint tried
            raise TlsRefused(f"etcd at {failed_at}: {refusal}") from error
        raise StoreUnavailable(f"no etcd endpoint answered ({', '.join(self.endpoints)}): {error}") from error

    async def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        observe, start = self.on_request, time.perf_counter()
        try:
            out = await self._json(await self._open(path, body))
        except StoreUnavailable as exc:  # a cancelled call is not observed
            if observe is not None:
                observe(path, time.perf_counter() - start, isinstance(exc, EtcdError))
            raise
        if observe is not None:
            observe(path, time.perf_counter() - start, True)
        return out

    @staticmethod
    async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            async with resp:
                out: dict[str, Any] = await resp.json(content_type=None)
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable(f"etcd answer cut off: {str(exc) or type(exc).__name__}") from exc
        if "result" in out and isinstance(out["result"], dict):  # a one-message stream (keepalive)
            out = out["result"]
        if "error" in out:
            raise EtcdError(error_text(json.dumps(out["error"]).encode(), 200))
        return out

    # ---- raw key/value -------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        return (await self.read(key))[0]

    async def read(self, key: str) -> tuple[KeyValue | None, int]:
        """One key and the store revision it was read at (to watch from the next one)."""
        out = await self._call("/v3/kv/range", {"key": b64(key)})
        kvs = out.get("kvs") or []
        return (decode_kv(kvs[0]) if kvs else None), header_revision(out)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix` and the store revision they were read at."""
        out = await self._call("/v3/kv/range", prefix_range(prefix))
        return [decode_kv(kv) for kv in out.get("kvs") or []], header_revision(out)

    async def range_paged(self, key: str, range_end: bytes, *, revision: int = 0,
                          page_size: int = PAGE_KEYS) -> tuple[list[KeyValue], int]:
        """Every key in [key, range_end) in pages of `page_size` keys, all read at one store
        revision (`revision`, or the first page's): no answer grows past the gateway's 2 MiB
        cap however many keys there are. That revision is returned (watch from the next one).

        A revision compacted away between pages is an EtcdError: the caller reads again.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        start, kvs = key.encode(), []
        while True:
            body = {"key": b64(start), "range_end": b64(range_end), "limit": page_size}
            if revision:
                body["revision"] = revision
            out = await self._call("/v3/kv/range", body)
            revision = revision or header_revision(out)
            page = [decode_kv(kv) for kv in out.get("kvs") or []]
            kvs += page
            if not out.get("more") or not page:
                return kvs, revision
            start = page[-1].key.encode() + b"\0"

    async def get_prefix_paged(self, prefix: str, *, revision: int = 0,
                               page_size: int = PAGE_KEYS) -> tuple[list[KeyValue], int]:
        """`get_prefix` in pages (see `range_paged`)."""
        return await self.range_paged(prefix, prefix_end(prefix), revision=revision, page_size=page_size)

    async def snapshot(self, *, keys: Sequence[str] = (),
                       prefixes: Sequence[str] = ()) -> tuple[dict[str, list[KeyValue]], int]:
        """Keys and prefixes read in one transaction, so all at one store revision (Patroni
        builds its `Cluster` from one read): what each key or prefix holds, and that revision.

        A txn with no compares takes its success branch, here range reads only: nothing is
        written, and the answer's header revision is the one every range was read at (watch
        from the next one to miss nothing).
        """
        asked = [*keys, *prefixes]
        if len(set(asked)) != len(asked):
            raise ValueError(f"each key or prefix once: {asked}")
        ranges = [{"key": b64(k)} for k in keys] + [prefix_range(p) for p in prefixes]
        out = await self._txn([], [{"request_range": r} for r in ranges])
        responses = out.get("responses") or []
        if len(responses) != len(ranges):
            raise EtcdError(f"a txn of {len(ranges)} range reads answered {len(responses)}")
        read = {name: [decode_kv(kv) for kv in (r.get("response_range") or {}).get("kvs") or []]
                for name, r in zip(asked, responses, strict=True)}
        return read, header_revision(out)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        revision = header_revision(await self._call("/v3/kv/put", put_request(key, value, lease)))
        self._wrote(revision)
        return revision

    async def delete(self, key: str) -> None:
        out = await self._call("/v3/kv/deleterange", {"key": b64(key)})
        if int(out.get("deleted", 0)) > 0:
            self._wrote(header_revision(out))

    def _wrote(self, revision: int) -> None:
        self.written_revision = max(self.written_revision, revision)

    def watch_key(self, key: str, start_revision: int, *, idle_s: float = WATCH_IDLE_S) -> AsyncGenerator[WatchEvent, None]:
        """Events of exactly `key` from `start_revision` on (see `watch_prefix`)."""
        return self._watch(key, None, start_revision, idle_s)

    def watch_prefix(self, prefix: str, start_revision: int, *, idle_s: float = WATCH_IDLE_S) -> AsyncGenerator[WatchEvent, None]:
        """Events under `prefix` from `start_revision` on (read once, then watch from rev+1).

        A watch quiet for `idle_s` is opened again from the revision after the last event
        (so a silently dead peer is noticed: the re-open fails). The stream ends with
        WatchLost when etcd cancels the watch (e.g. the revision was compacted away) or the
        connection drops: the caller re-reads and re-watches. Also when the member it is open
        on loses its leader (`REQUIRE_LEADER`): a watch on a member cut off from the quorum
        would otherwise stay silent, and its reader stale, for ever.
        """
        return self._watch(prefix, prefix_end(prefix), start_revision, idle_s)

    async def _watch(self, key: str, range_end: bytes | None, start_revision: int,
                     idle_s: float) -> AsyncGenerator[WatchEvent, None]:
        next_rev = start_revision
        while True:
            create: dict[str, Any] = {"key": b64(key), "start_revision": next_rev}
            if range_end is not None:
                create["range_end"] = b64(range_end)
            resp = await self._open("/v3/watch", {"create_request": create}, idle_s=idle_s, require_leader=True)
            async with resp:
                try:
                    async for message in json_stream(resp.content):
                        events, ended = watch_message(message)
                        if ended:
                            raise WatchLost(f"watch on {key} {ended}")
                        for event in events:
                            next_rev = max(next_rev, event.revision + 1)
                            yield event
                except TimeoutError:
                    continue  # nothing for idle_s: open it again from next_rev
                except _TRANSPORT_ERRORS as exc:
                    raise WatchLost(f"watch on {key} broken: {str(exc) or type(exc).__name__}") from exc
            raise WatchLost(f"watch on {key} closed by the server")

    async def version(self) -> ServerVersion:
        """etcd's `GET /version` (no RBAC token needed) and the answer's Date, from the first
        endpoint that answers: what `pdsupervisor doctor` checks."""
        resp = await self._send("/version", None, None, None)
        try:
            return server_version(await self._json(resp), resp.headers.get("Date"))
        except ValueError as exc:  # something answered 200, but not in JSON: not etcd
            raise EtcdError(f"{resp.url} answered something else than JSON: {exc}") from exc

    async def compact(self, revision: int) -> None:
        """Drop history before `revision` (etcd's auto-compaction does this on a schedule)."""
        await self._call("/v3/kv/compaction", {"revision": revision})

    async def current_revision(self) -> int:
        return header_revision(await self._call("/v3/kv/range", {"key": b64(self.keys.root), "count_only": True}))

    # ---- etcd's own members ------------------------------------------------------------

    async def member_list(self, url: str, timeout_s: float = 1.0) -> list[dict[str, Any]]:
        """etcd's member list (`ID`, `name`, `peerURLs`, `clientURLs`, `isLearner`, as the gateway
        spells them) from the member at client URL `url`: its own view, with or without a quorum."""
        return list((await self._post_at(url, "/v3/cluster/member/list", timeout_s)).get("members") or [])

    async def member_status(self, url: str, timeout_s: float = 1.0) -> dict[str, Any]:
        """`/v3/maintenance/status` of the member at client URL `url`: its leader, raft term and
        index, database size, alarms."""
        return await self._post_at(url, "/v3/maintenance/status", timeout_s)

    async def _post_at(self, url: str, path: str, timeout_s: float) -> dict[str, Any]:
        """An empty POST to `path` of the member at `url` itself (not the first endpoint that
        answers). StoreUnavailable when it does not answer within `timeout_s`."""
        await self.connect()
        assert self._session is not None
        headers = await self._auth.header(self._authenticate) if self._auth else None
        try:
            async with self._session.post(url.rstrip("/") + path, json={}, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                body = await resp.read()
        except _TRANSPORT_ERRORS as exc:
            if refusal := tls_refusal(exc):
                raise TlsRefused(f"etcd at {url}: {refusal}") from exc
            raise StoreUnavailable(f"etcd at {url}: {str(exc) or type(exc).__name__}") from exc
        if resp.status != 200:
            raise EtcdError(error_text(body, resp.status))
        try:
            out: dict[str, Any] = json.loads(body)
        except ValueError as exc:
            raise EtcdError(f"{url} answered something else than JSON: {exc}") from exc
        return out

    async def member_remove(self, member_id: int) -> None:
        """Remove a member from the cluster (it needs a quorum)."""
        await self._call("/v3/cluster/member/remove", {"ID": str(member_id)})

    async def member_add(self, peer_urls: list[str]) -> dict[str, Any]:
        """Add a member at `peer_urls` (it must then start with initial-cluster-state existing);
        the new member as the gateway spells it."""
        out = await self._call("/v3/cluster/member/add", {"peerURLs": peer_urls})
        return dict(out.get("member") or {})

    # ---- leases --------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        return int((await self._call("/v3/lease/grant", {"TTL": ttl}))["ID"])

    async def refresh_lease(self, lease_id: int) -> int:
        """Send one keep-alive; the remaining TTL, or 0 when the lease is gone."""
        out = await self._call("/v3/lease/keepalive", {"ID": lease_id})
        return max(0, int(out.get("TTL", 0)))

    async def lease_granted_ttl(self, lease_id: int) -> int:
        """The TTL a lease was granted with (0 when it no longer exists)."""
        out = await self._call("/v3/lease/timetolive", {"ID": lease_id})
        return max(0, int(out.get("grantedTTL", 0))) if int(out.get("TTL", 0)) > 0 else 0

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke; the keys under the lease are deleted (counted as our write: see `written_revision`)."""
        with contextlib.suppress(StoreUnavailable):
            self._wrote(header_revision(await self._call("/v3/lease/revoke", {"ID": lease_id})))

    async def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                   failure: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        out = await self._call("/v3/kv/txn", {"compare": compare, "success": success, "failure": list(failure)})
        # a txn that put or deleted something moved the store to its header revision
        if out.get("succeeded") and any(
                "request_put" in op or int((r.get("response_delete_range") or {}).get("deleted", 0)) > 0
                for op, r in zip(success, out.get("responses") or [], strict=False)):
            self._wrote(header_revision(out))
        return out

    # ---- typed cluster records ------------------------------------------------------

    async def get_model(self, key: str, model: type[M]) -> M | None:
        kv = await self.get(key)
        return model.model_validate_json(kv.value) if kv else None

    async def get_models(self, prefix: str, model: type[M]) -> dict[str, M]:
        kvs, _ = await self.get_prefix(prefix)
        return decode_models(kvs, prefix, model)

    async def register_member(self, facts: NodeFacts, lease_id: int) -> None:
        await self.put(self.keys.member(facts.name), _dump(facts), lease=lease_id)

    async def members(self) -> dict[str, NodeFacts]:
        return await self.get_models(self.keys.members, NodeFacts)

    async def assignment(self, node: str) -> NodeAssignment | None:
        return await self.get_model(self.keys.assignment(node), NodeAssignment)

    async def assignments(self) -> dict[str, NodeAssignment]:
        return await self.get_models(self.keys.assignments, NodeAssignment)

    async def put_status(self, status: NodeStatus) -> None:
        await self.put(self.keys.node_status(status.node), _dump(status))

    async def put_spec_record(self, record: Mapping[str, Any], *, expect_mod_revision: int | None = None) -> bool:
        """Write the spec record; with `expect_mod_revision`, only if nobody wrote it since."""
        if expect_mod_revision is None:
            await self.put(self.keys.spec, _dump(record))
            return True
        out = await self._txn([compare_mod(self.keys.spec, expect_mod_revision)],
                              [{"request_put": put_request(self.keys.spec, _dump(record))}])
        return bool(out.get("succeeded"))

    # ---- leader election and fenced writes -------------------------------------------

    async def leader(self) -> str | None:
        kv = await self.get(self.keys.leader)
        return kv.value.decode() if kv else None

    async def acquire_leader(self, name: str, lease_id: int) -> bool:
        """Take the leader key if nobody holds it (create_revision == 0), or keep it if it is
        already ours under this very lease (e.g. after one failed cycle made us step down).

        The failure branch reads the key in the same transaction: trust our own CAS, not a
        separate read.
        """
        out = await self._txn(
            [{"key": b64(self.keys.leader), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            [{"request_put": put_request(self.keys.leader, name.encode(), lease_id)}],
            [{"request_range": {"key": b64(self.keys.leader)}}],
        )
        return bool(out.get("succeeded")) or self._holder_matches(out, name, lease_id)

    @staticmethod
    def _holder_matches(failed_txn: Mapping[str, Any], name: str, lease_id: int | None = None) -> bool:
        """Whether the leader key read in a failed txn's failure branch is `name`'s (under `lease_id`)."""
        responses = failed_txn.get("responses") or [{}]
        held = [decode_kv(kv) for kv in (responses[0].get("response_range") or {}).get("kvs") or []]
        return bool(held) and held[0].value == name.encode() and lease_id in (None, held[0].lease)

    async def release_leader(self, name: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._txn([compare_value(self.keys.leader, name)],
                            [{"request_delete_range": {"key": b64(self.keys.leader)}}])

    async def write_as_leader(
        self,
        name: str,
        puts: Mapping[str, bytes | BaseModel | Mapping[str, Any]],
        deletes: Sequence[str] = (),
        *,
        unchanged: Mapping[str, int] | None = None,
        max_ops: int = TXN_MAX_OPS,
        max_bytes: int = TXN_MAX_BYTES,
        parallel: int = TXN_PARALLEL,
    ) -> LeaderWriteResult:
        """Apply puts, then deletes, in that order, while `name` holds the leader key and every
        key in `unchanged` still has the mod revision it was read at (0: absent).

        In transactions of at most `max_ops` operations and `max_bytes` of keys and values
        (etcd refuses a txn of more than 128 operations, a request over ~1.5 MiB, and its
        gateway a message over 2 MiB), each fenced on the leader key and on `unchanged`: a key
        an earlier chunk wrote at the revision that chunk made, so a caller that puts its spec
        record first keeps the rest fenced on it (a stop or a replacing spec submitted
        meanwhile makes the next chunk "changed"). Chunks that write no fenced key go `parallel`
        at a time (each txn waits for etcd's disk; concurrent ones share it), in order.

        Not all-or-nothing across chunks: the result says how many keys were written before a
        chunk was refused. A crash (or a refusal) between chunks leaves a part of one decision
        written; a caller that decides from what etcd holds converges anyway: its next
        decision, or a new leader's, reads that part back and writes the rest, or what a newer
        spec asks for. Put first what the rest depends on (the coordinator: the spec record).

        Not written: "deposed" (the leader key is not ours) or "changed" (what the decision
        was based on changed meanwhile), told apart by the leader key read in the same txn.
        RequestTooLarge: etcd refused a chunk for its size (a single value over its limit).
        """
        ops: list[tuple[str, bytes | None]] = [(k, v if isinstance(v, bytes) else _dump(v)) for k, v in puts.items()]
        ops += [(k, None) for k in deletes]
        chunks = op_chunks(ops, max_ops=max_ops, max_bytes=max_bytes) or [[]]
        fences = dict(unchanged or {})
        written = txns = 0
        while chunks:
            # a chunk that writes a fenced key goes alone (the next are fenced on its write);
            # the others, all fenced alike, `parallel` at a time (etcd commits them together)
            wave = [chunks.pop(0)]
            while wave[0] and chunks and len(wave) < parallel and not _writes_any(wave[0], fences) \
                    and not _writes_any(chunks[0], fences):
                wave.append(chunks.pop(0))
            answers = await asyncio.gather(*(self._leader_txn(name, c, fences) for c in wave), return_exceptions=True)
            refused: list[LeaderWrite] = []
            for chunk, answer in zip(wave, answers, strict=True):
                if isinstance(answer, BaseException):
                    continue
                if not answer.get("succeeded"):
                    refused.append("changed" if self._holder_matches(answer, name) else "deposed")
                    continue
                written += len(chunk)
                txns += 1
                for k, v in chunk:
                    if k in fences:  # written by us: the next chunks are fenced on our own write
                        fences[k] = header_revision(answer) if v is not None else 0
            errors = [a for a in answers if isinstance(a, BaseException)]
            if errors:
                raise errors[0]
            if refused:
                return LeaderWriteResult("deposed" if "deposed" in refused else "changed", written, txns)
        return LeaderWriteResult("written", written, txns)

    async def _leader_txn(self, name: str, chunk: list[tuple[str, bytes | None]],
                          fences: Mapping[str, int]) -> dict[str, Any]:
        """One chunk of `write_as_leader`: applied if `name` holds the leader key and `fences` hold."""
        requests = [{"request_put": put_request(k, v)} if v is not None
                    else {"request_delete_range": {"key": b64(k)}} for k, v in chunk]
        compare = [compare_value(self.keys.leader, name)]
        compare += [compare_mod(k, rev) for k, rev in fences.items()]
        try:
            return await self._txn(compare, requests, [{"request_range": {"key": b64(self.keys.leader)}}])
        except EtcdError as exc:
            if too_large(str(exc)):
                size = sum(len(k) + len(v or b"") for k, v in chunk)
                raise RequestTooLarge(f"etcd refused a write of {len(chunk)} keys ({size} bytes, the largest "
                                      f"{max(chunk, key=lambda kv: len(kv[1] or b''))[0]}): {exc}") from exc
            raise

    # ---- events ----------------------------------------------------------------------

    async def append_event(self, kind: str, message: str, **fields: Any) -> None:
        """Record an event for people. Keys sort by time; old ones are trimmed."""
        event = {"ts": time.time(), "kind": kind, "message": message, **fields}
        key = f"{self.keys.events}{time.time_ns():020d}"
        await self.put(key, _dump(event))

    async def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` events, oldest first (one read of just those keys)."""
        out = await self._call("/v3/kv/range", prefix_range(
            self.keys.events, limit=limit, sort_order="DESCEND", sort_target="KEY"))
        return [json.loads(decode_kv(kv).value) for kv in reversed(out.get("kvs") or [])]

    async def trim_events(self, keep: int = EVENTS_KEPT) -> None:
        """Delete all but the newest `keep` events: a count, the excess keys, one range delete."""
        prefix = self.keys.events
        counted = await self._call("/v3/kv/range", prefix_range(prefix, count_only=True))
        excess = int(counted.get("count", 0)) - keep
        if excess <= 0:
            return
        oldest = await self._call("/v3/kv/range", prefix_range(prefix, keys_only=True, limit=excess))
        last = unb64((oldest.get("kvs") or [{}])[-1].get("key"))
        if last:
            await self._call("/v3/kv/deleterange", {"key": b64(prefix), "range_end": b64(last + b"\0")})
