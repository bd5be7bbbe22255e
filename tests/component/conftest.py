"""Fixtures the TLS component tests share: a PKI and an etcd serving TLS with client-cert auth."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
