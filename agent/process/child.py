"""A live process the agent watches (`Child`), and the readiness probe (`probe_once`).

Exit notification uses a pidfd (no polling, works for adopted processes that are not our
children too). Exit codes follow Python's convention: a process killed by signal N is
reported as `-N` (SIGKILL: -9). An adopted process's exit code cannot be known (it is not
our child): `reap` returns None.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import psutil

from agent.process import proctree
from pdsupervisor.core.models import Probe


async def probe_once(p: Probe) -> bool:
    """HTTP GET answering 200, or a TCP connect, within the probe's timeout."""
    writer = None
    try:
        async with asyncio.timeout(p.timeout_s):
            reader, writer = await asyncio.open_connection(p.host, p.port)
            if p.kind == "tcp":
                return True
            writer.write(
                f"GET {p.path} HTTP/1.1\r\nHost: {p.host}:{p.port}\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
            parts = line.split()
            return len(parts) >= 2 and parts[1] == b"200"
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


class Child:
    """A live process we watch: our own Popen, or an adopted pid (psutil only)."""

    def __init__(self, proc: psutil.Process, create_time: float, popen: subprocess.Popen[bytes] | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.create_time = create_time  # seconds after boot (proctree.started)
        self.popen = popen
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = None
        self._poller: asyncio.Future[None] | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
            self._loop.add_reader(self._pidfd, self._on_exit)
        except ProcessLookupError:
            self._exited.set()
        except OSError:  # no pidfd support: poll
            self._pidfd = None
            self._poller = asyncio.ensure_future(self._poll())

    def _on_exit(self) -> None:
        self._close_fd()
        self._exited.set()

    def _close_fd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def _poll(self) -> None:
        while not proctree.gone(self.proc):
            await asyncio.sleep(1.0)
        self._exited.set()

    def detach(self) -> None:
        """Forget the process without touching it (agent shutdown)."""
        self._close_fd()
        if self._poller is not None:
            self._poller.cancel()

    async def wait(self) -> None:
        await self._exited.wait()

    async def exit_code(self) -> int | None:
        """The exit code of our exited child, read without reaping it (`WNOWAIT`): its zombie
        keeps the pid reserved, so what still names it (its session, its group) is its own
        while the leftovers are stopped. None for an adopted process (not ours to wait for).
        """
        if self.popen is None:
            return None
        for _ in range(100):  # the pidfd may say it exited a moment before waitid sees it
            try:
                res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped already (Popen did): it kept the code
                return self.popen.returncode
            if res is not None:
                return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
            await asyncio.sleep(0.02)
        return None

    async def reap(self) -> int | None:
        """Collect the exit code (our child) or None (adopted: not ours to wait for)."""
        if self.popen is None:
            return None
        for _ in range(100):
            rc = self.popen.poll()
            if rc is not None:
                return rc
            await asyncio.sleep(0.02)
        return self.popen.poll()
