"""A watch on an etcd member that loses its quorum ends (WatchLost) instead of staying silent.

Two real members (127.0.0.2, 127.0.0.3, short election timeouts); the watch is open on the
first; the second is killed: the first has no leader, and the watch must end within seconds
(without `REQUIRE_LEADER` it stays open and silent until its idle re-open, and that re-open
lands on the same leaderless member again).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.local.ports import free_port
from pdsupervisor.local.procs import kill_tree
from pdsupervisor.store.embedded import etcd_binary
from pdsupervisor.store.etcd import Store, StoreUnavailable, WatchLost

HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}
FAST_RAFT = ["--heartbeat-interval", "50", "--election-timeout", "500"]


@pytest.fixture
def two_members(tmp_path: Path) -> Iterator[tuple[dict[str, subprocess.Popen[bytes]], int]]:
    client_port = free_port(HOSTS["a"], span=2)  # the same ports on both hosts (etcd_argv's members)
    peer_port = client_port + 1
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, host in HOSTS.items():
            argv = etcd_argv(name=name, data_dir=str(tmp_path / name), client_host=host, client_port=client_port,
                             peer_port=peer_port, binary=etcd_binary(), members=HOSTS, token="watch-leader",
                             extra=FAST_RAFT)
            log = open(tmp_path / f"{name}.log", "ab")
            procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield procs, client_port
    finally:
        for proc in procs.values():
            kill_tree(proc.pid)


async def test_watch_on_a_member_without_quorum_ends(two_members) -> None:
    procs, port = two_members
    async with Store([f"{HOSTS['a']}:{port}"], "wl", timeout_s=2.0) as store:
        async def writable() -> bool:
            try:
                await store.put(store.keys.root + "x", b"0")
            except Exception:
                return False
            return True

        async with asyncio.timeout(20):  # the two members elect a leader and take a write
            while not await writable():
                await asyncio.sleep(0.1)
        rev = await store.current_revision()
        watch = store.watch_prefix(store.keys.root, rev + 1, idle_s=60.0)
        first = asyncio.ensure_future(anext(watch))
        await store.put(store.keys.root + "x", b"1")
        assert (await asyncio.wait_for(first, 10)).value == b"1"  # the watch is open on member a

        kill_tree(procs["b"].pid)  # a alone: no quorum, no leader
        with pytest.raises(WatchLost):
            async with asyncio.timeout(20):  # far below idle_s: the header, not the idle re-open, ends it
                async for _ in watch:
                    pass
        await watch.aclose()

        # A watch asked of the leaderless member again is refused ("no leader"), and the store
        # then asks the next endpoint first, not the member cut off from the quorum.
        elsewhere = f"{HOSTS['b']}:{free_port(HOSTS['b'])}"
        async with Store([f"{HOSTS['a']}:{port}", elsewhere], "wl", timeout_s=2.0) as other:
            with pytest.raises(StoreUnavailable, match="no leader"):
                await anext(other.watch_prefix(other.keys.root, rev + 1, idle_s=60.0))
            assert other.endpoints[other._endpoint_order()[0]].endswith(elsewhere)
