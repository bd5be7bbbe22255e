"""Finding and ending whole families of local processes: what `no process left behind` rests on."""

from __future__ import annotations

import os
import signal

import psutil


def marked_processes(env_name: str, value: str) -> list[psutil.Process]:
    """Live processes (not this one) whose environment has `env_name` equal to `value`.

    Children inherit the environment, so this finds a whole family of processes even after
    their parents died or they left the process group.
    """
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid():
                continue
            if p.environ().get(env_name) == value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def kill_tree(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL a process and every descendant (collected before the first signal)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    signal_all(procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=timeout)
