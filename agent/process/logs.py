"""Per-process log files: children write straight to them, the agent copy-truncates.

Why not pipes: a pipe through the agent breaks when the agent dies, and engines must
outlive an agent restart. So each child gets `<state>/logs/<name>.log` opened O_APPEND as
its stdout and stderr. Rotation copies the file to `.1` (shifting older copies) and
truncates the original in place; O_APPEND makes the child's next write land at the new end.
A few lines written between the copy and the truncate can be lost: the accepted cost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from pdsupervisor.aio.wait import wait_event


def open_log(path: Path) -> int:
    """An O_APPEND fd for a child's stdout/stderr (caller closes it after the spawn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


def rotate_if_needed(path: Path, max_bytes: int, keep: int) -> bool:
    """Copy-truncate `path` when it exceeds `max_bytes`; True if it rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if keep > 0:
        for i in range(keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as f:
        f.truncate(0)
    return True


def tail(path: Path, lines: int, chunk: int = 65536) -> list[str]:
    """The last `lines` lines of `path` (reads backwards, chunk by chunk: linear in what it reads)."""
    blocks: list[bytes] = []
    newlines = 0
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            while end > 0 and newlines <= lines:
                step = min(chunk, end)
                end -= step
                f.seek(end)
                blocks.append(f.read(step))
                newlines += blocks[-1].count(b"\n")
    except FileNotFoundError:
        return []
    out = b"".join(reversed(blocks)).decode(errors="replace").splitlines()
    return out[-lines:] if lines > 0 else []


async def follow(path: Path, until: asyncio.Event, interval_s: float = 0.5) -> AsyncIterator[bytes]:
    """Bytes appended to `path` from now on, until `until` is set; restarts from the top after
    a truncation. The agent sets `until` when it stops, so a follower never holds it up."""
    pos = path.stat().st_size if path.exists() else 0
    while not until.is_set():
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < pos:
            pos = 0
        if size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read(size - pos)
            pos += len(data)
            yield data
        await wait_event(until, interval_s)
