"""Fixtures component tests share: a PKI and an etcd serving TLS with client-cert auth; a
supervised process whose tree is killed at teardown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from agent.process.statefile import ProcStore
from agent.process.supervisor import ManagedProcess
from pdsupervisor.core.models import ProcessSpec, ProcessStatus
from pdsupervisor.local.procs import kill_tree
from tests.component.test_store_tls import Pkis
from tests.conftest import EtcdServer


@pytest.fixture(scope="module")
def pkis(tmp_path_factory) -> Pkis:
    return Pkis(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory, pkis) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("tls-etcd"), tls=pkis.server, client=pkis.admin)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def managed(tmp_path):
    """Start a ManagedProcess (records under tmp_path/procs unless `records` is given); `seen`
    records its status after every change, as the reconciler reports it: once the change's
    synchronous steps are done (a spawn's `starting` is never written on its own). Trees
    killed at teardown."""
    started: list[ManagedProcess] = []

    def make(spec: ProcessSpec, records: ProcStore | None = None,
             seen: list[ProcessStatus] | None = None) -> ManagedProcess:
        m: ManagedProcess

        def changed() -> None:
            if seen is not None:
                asyncio.get_running_loop().call_soon(lambda: seen.append(m.status()))

        m = ManagedProcess(spec, records=records or ProcStore(tmp_path / "procs"), log_dir=tmp_path / "logs",
                           on_change=changed)
        started.append(m)
        m.start()
        return m

    yield make
    for m in started:
        if m.pid:
            kill_tree(m.pid)
