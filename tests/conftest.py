"""Shared fixtures: a real etcd server per test module, free ports, process-tree cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.core.models import TlsFiles
from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree
from pdsupervisor.store.embedded import etcd_binary


class _Poll:
    """One condition polled until a deadline: the part `wait_for` and `until` share."""

    def __init__(self, predicate, timeout: float, what: str) -> None:
        self.predicate, self.timeout, self.what = predicate, timeout, what
        self.deadline = time.monotonic() + timeout

    def check(self):
        """The predicate's value when truthy; None to try again; AssertionError past the deadline."""
        last = self.predicate()
        if last:
            return last
        if time.monotonic() >= self.deadline:
            raise AssertionError(f"timed out after {self.timeout}s waiting for {self.what} (last: {last!r})")
        return None


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test on timeout."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.check()) is None:
        time.sleep(interval)
    return value


async def until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """`wait_for` inside an event loop: the loop keeps running while we poll."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.check()) is None:
        await asyncio.sleep(interval)
    return value


def write(root: Path, rel: str, text: str = "") -> None:
    """Write `text` to root/rel, making the directories: one file of a fake /sys, /proc or /dev tree."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


class EtcdServer:
    """A real etcd; plaintext, or with `tls` (its server files) TLS with client-certificate
    auth, then checked with `client` (a client certificate of the same CA)."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1", tls: TlsFiles | None = None,
                 client: TlsFiles | None = None, extra: list[str] | None = None) -> None:
        self.host = host
        self.port = free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = tmp / "etcd-data"
        self.tls, self.client, self.extra = tls, client, extra or []
        self.user: str | None = None  # `name:password` for etcdctl, once RBAC is on
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def etcdctl(self, *args: str, **run) -> subprocess.CompletedProcess:
        tls = [] if self.client is None else [
            "--cacert", self.client.ca_file, "--cert", self.client.cert_file, "--key", self.client.key_file]
        user = ["--user", self.user] if self.user else []
        return subprocess.run([etcd_binary("etcdctl"), "--endpoints", self.url, *tls, *user, *args],
                              capture_output=True, timeout=5, **run)

    def start(self) -> None:
        argv = etcd_argv(
            name="test", data_dir=str(self.data_dir), client_host=self.host,
            client_port=self.port, peer_port=self.peer_port, binary=etcd_binary(), tls=self.tls, extra=self.extra,
        )
        self.log = open(self.data_dir.parent / "etcd.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._answers, timeout=20, what="etcd to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                pass
        except OSError:
            return False
        return self.etcdctl("endpoint", "health").returncode == 0

    def pause(self) -> None:
        """SIGSTOP, then wait until every thread of etcd is stopped: kill() returns before a
        thread running on another CPU has stopped, and a request sent at once could be served."""
        assert self.proc
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_for(self._stopped, timeout=10, what="etcd's threads to stop after SIGSTOP")

    def _stopped(self) -> bool:
        assert self.proc
        tasks = Path(f"/proc/{self.proc.pid}/task")
        states = []
        for task in tasks.iterdir():
            try:
                states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
            except (OSError, IndexError):
                continue  # a thread that just ended
        return bool(states) and all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        """SIGCONT, then wait until etcd answers again: the next step of a test must not race
        etcd's own catch-up (a loaded machine took more than a 0.5 s call timeout)."""
        assert self.proc
        os.kill(self.proc.pid, signal.SIGCONT)
        wait_for(self._answers, timeout=20, what="etcd to answer after SIGCONT")

    def stop(self) -> None:
        if self.proc:
            try:
                with contextlib.suppress(ProcessLookupError):  # etcd may be dead already
                    os.kill(self.proc.pid, signal.SIGCONT)
                kill_tree(self.proc.pid)
                self.proc.wait(timeout=5)
            finally:
                self.log.close()


@contextlib.contextmanager
def running_etcd(data_parent: Path) -> Iterator[EtcdServer]:
    """A real etcd under `data_parent`, stopped (whole tree) however the block ends."""
    server = EtcdServer(data_parent)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory) -> Iterator[EtcdServer]:
    """A real etcd for the whole module (tests use distinct cluster names to stay apart)."""
    with running_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def cluster_name(request) -> str:
    """A cluster name unique to the test, so tests sharing one etcd never see each other."""
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60] + f"-{os.getpid()}"


@pytest.fixture
def black_hole() -> Iterator[str]:
    """host:port of a listener whose accept queue is full: SYNs are dropped, a connect hangs."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue: later SYNs are dropped
            c = socket.socket()
            fillers.append(c)
            c.setblocking(False)
            c.connect_ex(hole.getsockname())
        yield f"127.0.0.1:{hole.getsockname()[1]}"
    finally:
        for c in fillers:
            c.close()
        hole.close()


@pytest.fixture
def procs(tmp_path):
    """Processes started through `pdproc.Procs`; every tree is killed at teardown."""
    from tests.pdproc import Procs  # pdproc imports this module

    started = Procs(tmp_path)
    yield started
    started.kill_all()
