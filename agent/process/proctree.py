"""Killing whole process trees without ever signalling a stranger.

A tree is collected before the first signal: the root's descendants
(`children(recursive=True)`, which catches grandchildren that called setsid) plus every
member of the root's session (catches orphans already reparented away). The session is
scanned while the root pid still identifies our process (same start time, zombie
allowed) or names no process at all (a pid is not reused while it names a session); never
when the pid belongs to someone else.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from dataclasses import dataclass, field

import psutil

GRACE_AFTER_KILL_S = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TOLERANCE_S = 0.05  # start times are whole clock ticks: equal, give or take rounding


def started(pid: int) -> float:
    """Seconds from boot to the process's start (`starttime` of /proc/<pid>/stat).

    This is the process's identity with its pid. Unlike psutil's `create_time()` (boot time
    + this), it does not move when the wall clock is stepped (NTP), so a step can neither
    make us miss our own process nor take a stranger for it.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise psutil.NoSuchProcess(pid) from None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return int(fields[19]) / CLOCK_TICKS  # field 22, starttime, in clock ticks


@functools.cache
def boot_id() -> str:
    """Changes at every boot: start times from a previous boot identify nothing."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def same_process(pid: int, start: float) -> psutil.Process | None:
    """The process `pid` if it is still the one that started at `start` (zombies included)."""
    try:
        p = psutil.Process(pid)
        if abs(started(pid) - start) <= START_TOLERANCE_S:
            return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return True


def collect_tree(pid: int, start: float) -> list[psutil.Process]:
    """Root (if still ours and alive), its descendants and its session's members.

    With the root gone (an adopted engine is not our child: init reaps it at once), its
    session's members are still found: Linux does not hand out a pid while it still names a
    session, so processes whose session id is `pid` can only be our root's leftovers.
    """
    root = same_process(pid, start)
    found: dict[int, psutil.Process] = {}
    if root is None:
        if psutil.pid_exists(pid):
            return []  # the pid now belongs to someone else: never touch its session
    else:
        if not gone(root):
            found[root.pid] = root
        try:
            for c in root.children(recursive=True):
                found.setdefault(c.pid, c)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid in found or p.pid == me:
            continue
        try:
            if os.getsid(p.pid) == pid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError):
            continue
    return [p for p in found.values() if not gone(p)]


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)  # psutil refuses if the pid was reused meanwhile
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


async def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    alive = [p for p in procs if not gone(p)]
    while alive and loop.time() < deadline:
        await asyncio.sleep(0.05 if timeout < 2 else 0.1)
        alive = [p for p in alive if not gone(p)]
    return alive


@dataclass(frozen=True)
class TreeStop:
    """How a tree stop went: `escalated` were still alive `timeout` after `sig` and got
    SIGKILL; `left` survived even that (should be empty; the caller logs it)."""

    escalated: list[psutil.Process] = field(default_factory=list)
    left: list[psutil.Process] = field(default_factory=list)


async def stop_tree(pid: int, start: float, sig: int, timeout: float) -> TreeStop:
    """`sig` to the whole tree and its process group, wait `timeout`, SIGKILL the rest."""
    procs = collect_tree(pid, start)
    if not procs:
        return TreeStop()
    root_is_ours = same_process(pid, start) is not None
    if root_is_ours:
        try:
            os.killpg(pid, sig)  # our children lead their own session and group (pgid == pid)
        except (ProcessLookupError, PermissionError):
            pass
    _signal_all(procs, sig)
    alive = await _wait_gone(procs, timeout)
    escalated = list(alive)
    if alive or root_is_ours:
        if same_process(pid, start) is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _signal_all(alive, signal.SIGKILL)
        alive = await _wait_gone(alive, GRACE_AFTER_KILL_S)
    return TreeStop(escalated, alive)


async def terminate_tree(pid: int, start: float, sig: int, timeout: float) -> list[psutil.Process]:
    """`stop_tree`, returning what is still alive afterwards."""
    return (await stop_tree(pid, start, sig, timeout)).left
