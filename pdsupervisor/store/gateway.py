"""How etcd's v3 JSON gateway spells requests and answers (no I/O; `Store` makes the calls).

Keys and values travel base64-encoded, int64 fields as strings, and zero values are left
out of answers.
"""

from __future__ import annotations

import base64
import email.utils
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    key: str
    value: bytes | None  # None for a delete
    revision: int


@dataclass(frozen=True)
class ServerVersion:
    """etcd's `GET /version`, and when it answered."""

    server: str  # `etcdserver`, e.g. "3.5.17"
    date: float | None  # the answer's Date header, POSIX seconds (1 s resolution); None without one


def server_version(answer: object, date: str | None) -> ServerVersion:
    """The version etcd names (empty if none) and its Date header (None if none or unreadable)."""
    try:
        when = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        when = None
    return ServerVersion(str(answer.get("etcdserver", "")) if isinstance(answer, dict) else "", when)




def prefix_range(prefix: str, **options: Any) -> dict[str, Any]:
    """A range request body for every key under `prefix`, with etcd's range options."""
    return {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), **options}


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def put_request(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = lease
    return req


# What etcd (or its gateway) answers to a request over its limits: 128 ops per txn
# (`--max-txn-ops`), ~1.5 MiB per request (`--max-request-bytes`), 2 MiB per gateway message.
TOO_LARGE_MARKERS = ("too many operations in txn", "request is too large", "message larger than max")


def too_large(error: str) -> bool:
    """Whether etcd refused a request for its size or its count of operations."""
    return any(m in error for m in TOO_LARGE_MARKERS)


def op_chunks(ops: Sequence[tuple[str, bytes | None]], *, max_ops: int,
              max_bytes: int) -> list[list[tuple[str, bytes | None]]]:
    """`ops` ((key, value); None: a delete) cut, in order, into runs of at most `max_ops`
    operations and `max_bytes` of keys and values each (one larger op makes a run alone)."""
    if max_ops < 1 or max_bytes < 1:
        raise ValueError(f"max_ops and max_bytes must be positive, not {max_ops} and {max_bytes}")
    chunks: list[list[tuple[str, bytes | None]]] = []
    size = 0
    for key, value in ops:
        weight = len(key) + len(value or b"")
        if not chunks or len(chunks[-1]) >= max_ops or (chunks[-1] and size + weight > max_bytes):
            chunks.append([])
            size = 0
        chunks[-1].append((key, value))
        size += weight
    return chunks


def compare_mod(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": revision}


def compare_value(key: str, value: str) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "VALUE", "value": b64(value)}


def header_revision(out: Mapping[str, Any]) -> int:
    return int((out.get("header") or {}).get("revision", 0))


def decode_kv(kv: Mapping[str, Any]) -> KeyValue:
    """A gateway kv (base64 bytes, int64 as strings, zero values left out) as a KeyValue."""
    return KeyValue(
        key=unb64(kv.get("key")).decode(),
        value=unb64(kv.get("value")),
        mod_revision=int(kv.get("mod_revision", 0)),
        create_revision=int(kv.get("create_revision", 0)),
        lease=int(kv.get("lease", 0)),
    )


def decode_models(kvs: Iterable[KeyValue], prefix: str, model: type[M]) -> dict[str, M]:
    """The records read under `prefix`, by the rest of their key (a node's name)."""
    return {kv.key[len(prefix):]: model.model_validate_json(kv.value) for kv in kvs}


def watch_message(message: Mapping[str, Any]) -> tuple[list[WatchEvent], str | None]:
    """The events of one watch message, and why etcd ended the watch (None: it goes on)."""
    result = message.get("result")
    if not isinstance(result, dict):
        return [], f"failed: {message.get('error') or message}"
    if result.get("canceled") or int(result.get("compact_revision", 0)) > 0:
        return [], f"canceled (compacted to {result.get('compact_revision', 0)})"
    events = []
    for ev in result.get("events") or []:
        kv = ev.get("kv") or {}
        events.append(WatchEvent(
            key=unb64(kv.get("key")).decode(),
            value=None if ev.get("type") == "DELETE" else unb64(kv.get("value")),
            revision=int(kv.get("mod_revision", 0)),
        ))
    return events, None


def error_text(body: bytes, status: int) -> str:
    try:
        err = json.loads(body)
        return str(err.get("message") or err.get("error") or err) if isinstance(err, dict) else str(err)
    except ValueError:
        return f"HTTP {status}: {body[:200]!r}"


async def json_stream(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The gateway's stream of JSON messages (one per line; tolerant of any split)."""
    decoder = json.JSONDecoder()
    pending = b""
    async for chunk in content.iter_any():
        pending += chunk
        try:
            text = pending.decode()
        except UnicodeDecodeError:
            continue  # a character split across chunks: wait for the rest
        while True:
            text = text.lstrip()
            try:
                message, end = decoder.raw_decode(text)
            except ValueError:
                break  # empty or incomplete: wait for more bytes
            text = text[end:]
            if isinstance(message, dict):
                yield message
        pending = text.encode()
