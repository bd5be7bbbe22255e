"""Talking to an agent's REST API byte for byte (headers exactly as given), and what etcd holds."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from pdsupervisor.store.etcd import Store


def call(base: str, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10,
         tls: ssl.SSLContext | None = None) -> tuple[int, Any, dict[str, str]]:
    """(status, body as JSON (or text when it is not JSON), headers). Only `headers` and what
    HTTP needs (Host, Content-Length) are sent: no default Content-Type. An iterable body is
    sent chunked. `tls`: the client context for an https `base`."""
    url = urlsplit(base)
    conn = (http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout, context=tls) if url.scheme == "https"
            else http.client.HTTPConnection(url.hostname, url.port, timeout=timeout))
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        raw = resp.read()
        answer_headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        answer: Any = json.loads(raw)
    except ValueError:
        answer = raw.decode(errors="replace")
    return resp.status, answer, answer_headers


async def etcd_snapshot(etcd: str, cluster: str) -> list[tuple[str, bytes]]:
    """The cluster's keys in etcd, but for the agents' own (status, members, leader, their events)."""
    async with Store([etcd], cluster) as store:
        kvs, _ = await store.get_prefix(store.keys.root)
        liveness = ("/status/", "/members/", "/leader")  # the agents' own keys, not the cluster's
        return [(kv.key, kv.value) for kv in kvs if not any(k in kv.key for k in liveness)
                and not _agent_lifecycle_event(kv.key, kv.value)]


def _agent_lifecycle_event(key: str, value: bytes) -> bool:
    """An event the agents write on their own as they come up (leader taken, member joined):
    it may land between two snapshots; a request's own events (spec, assign) still count."""
    return "/events/" in key and json.loads(value).get("kind") in ("leader", "member")


def unchanged(c: Any, request: Callable[[], Any]) -> Any:
    """Run `request()` against cluster `c` (an AgentCluster); assert the cluster's keys in etcd
    are the same after it; return its answer."""
    before = asyncio.run(etcd_snapshot(c.etcd, c.cluster))
    answer = request()
    assert asyncio.run(etcd_snapshot(c.etcd, c.cluster)) == before
    return answer
