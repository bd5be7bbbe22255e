"""The store against a real etcd over TLS with client-certificate auth (certificates from our
own `pki` module), and against a real etcd with RBAC (user, password, token)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdsupervisor.core import pki
from pdsupervisor.core.models import TlsFiles
from pdsupervisor.host import pki as pki_files
from pdsupervisor.store.etcd import Store, StoreUnavailable, TlsRefused
from pdsupervisor.store.transport import Credentials, client_ssl_context, tls_context
from tests.conftest import EtcdServer


def _client(root: Path, name: str = pki.ADMIN) -> TlsFiles:
    d = root / pki.client_dir(name)
    return TlsFiles(ca_file=str(d / "ca.crt"), cert_file=str(d / "client.crt"), key_file=str(d / "client.key"))


class Pkis:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "pki"
        self.other = tmp / "other-pki"  # another CA: its certificates must get nowhere
        pki_files.init(self.root, [pki.NodeId("etcd", "127.0.0.1")])
        pki_files.init(self.other, [pki.NodeId("etcd", "127.0.0.1")])
        node = self.root / pki.node_dir("etcd")
        self.server = TlsFiles(ca_file=str(node / "ca.crt"), cert_file=str(node / "server.crt"),
                               key_file=str(node / "server.key"))
        self.admin = _client(self.root)
        self.stranger = _client(self.other)




async def _absent(server: EtcdServer, pkis: Pkis, cluster: str, key: str) -> bool:
    async with Store([server.endpoint], cluster, tls=tls_context(pkis.admin)) as store:
        return await store.get(key) is None


async def test_reads_writes_leases_and_watches_over_tls_with_a_client_certificate(tls_etcd, pkis, cluster_name):
    async with Store([tls_etcd.endpoint], cluster_name, tls=tls_context(pkis.admin)) as store:
        assert store.endpoints == [f"https://{tls_etcd.endpoint}"]  # no scheme given: https with TLS
        rev = await store.put(store.keys.root + "a", b"1")
        watch = store.watch_prefix(store.keys.root, rev + 1)
        lease = await store.grant_lease(30)
        await store.put(store.keys.root + "b", b"2", lease=lease)
        event = await anext(watch)
        await watch.aclose()
        assert (event.key, event.value) == (store.keys.root + "b", b"2")
        kvs, _ = await store.get_prefix(store.keys.root)
        assert [(kv.key[len(store.keys.root):], kv.value) for kv in kvs] == [("a", b"1"), ("b", b"2")]
        assert await store.refresh_lease(lease) > 0


@pytest.mark.parametrize("who", ["no client certificate", "a certificate of another CA"])
async def test_etcd_refuses_a_client_without_a_certificate_of_its_ca(tls_etcd, pkis, cluster_name, who):
    ctx = (client_ssl_context(pkis.admin.ca_file) if who == "no client certificate"
           else client_ssl_context(pkis.admin.ca_file, pkis.stranger.cert_file, pkis.stranger.key_file))
    key = f"/pdsupervisor/{cluster_name}/intruder"
    async with Store([tls_etcd.endpoint], cluster_name, tls=ctx, timeout_s=2) as store:
        with pytest.raises(StoreUnavailable):
            await store.put(key, b"root on every node")
    assert await _absent(tls_etcd, pkis, cluster_name, key)


async def test_the_store_refuses_an_etcd_its_ca_did_not_sign(tls_etcd, pkis, cluster_name):
    """A man in the middle with a certificate of another CA gets nothing, not even a read."""
    ctx = client_ssl_context(pkis.stranger.ca_file, pkis.admin.cert_file, pkis.admin.key_file)
    async with Store([tls_etcd.endpoint], cluster_name, tls=ctx, timeout_s=2) as store:
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            await store.get("/pdsupervisor/x")


async def test_version_over_tls_and_a_refused_handshake_says_which_side(tls_etcd, pkis, cluster_name):
    async with Store([tls_etcd.endpoint], cluster_name, tls=tls_context(pkis.admin)) as store:
        answer = await store.version()
    assert answer.server.startswith("3.") and answer.date is not None and abs(answer.date - time.time()) < 5
    refusals = {
        "etcd refused ours": (client_ssl_context(pkis.admin.ca_file), "it refused this client's certificate"),
        "we refused etcd's": (tls_context(TlsFiles(ca_file=pkis.stranger.ca_file, cert_file=pkis.admin.cert_file,
                                            key_file=pkis.admin.key_file)), "not one the CA bundle trusts"),
    }
    for ctx, words in refusals.values():
        async with Store([tls_etcd.endpoint], cluster_name, tls=ctx, timeout_s=2) as store:
            with pytest.raises(TlsRefused, match=f"etcd at https://{tls_etcd.endpoint}: .*{words}"):
                await store.version()


async def test_plaintext_to_a_tls_etcd_gets_nothing(tls_etcd, pkis, cluster_name):
    key = f"/pdsupervisor/{cluster_name}/plain"
    async with Store([f"http://{tls_etcd.endpoint}"], cluster_name, timeout_s=2) as store:
        with pytest.raises(StoreUnavailable):
            await store.put(key, b"x")
    assert await _absent(tls_etcd, pkis, cluster_name, key)


# ---- etcd RBAC ------------------------------------------------------------------------

PREFIX = "/pdsupervisor/"


@pytest.fixture
def rbac_etcd(tmp_path) -> Iterator[EtcdServer]:
    """A plaintext loopback etcd with auth on: `root`, and `pd` (readwrite under /pdsupervisor/)."""
    server = EtcdServer(tmp_path)
    try:
        server.start()
        for args in (["user", "add", "root", "--new-user-password", "root-pw"], ["user", "grant-role", "root", "root"],
                     ["role", "add", "pd"], ["role", "grant-permission", "pd", "--prefix=true", "readwrite", PREFIX],
                     ["user", "add", "pd", "--new-user-password", "pd-pw"], ["user", "grant-role", "pd", "pd"],
                     ["auth", "enable"]):
            out = server.etcdctl(*args)
            assert out.returncode == 0, out.stderr
        server.user = "root:root-pw"
        yield server
    finally:
        server.stop()


async def test_rbac_user_reads_writes_and_watches_with_a_token(rbac_etcd, cluster_name):
    async with Store([rbac_etcd.endpoint], cluster_name, auth=Credentials("pd", "pd-pw")) as store:
        rev = await store.put(store.keys.root + "a", b"1")
        watch = store.watch_prefix(store.keys.root, rev)
        event = await anext(watch)
        await watch.aclose()
        assert event.value == b"1"
        assert (await store.get(store.keys.root + "a")).value == b"1"
        with pytest.raises(StoreUnavailable, match="permission denied"):  # outside its role's prefix
            await store.put("/elsewhere", b"x")


@pytest.mark.parametrize("auth", [None, Credentials("pd", "wrong")], ids=["no-credentials", "wrong-password"])
async def test_rbac_refuses_without_the_right_password(rbac_etcd, cluster_name, auth):
    key = f"{PREFIX}{cluster_name}/x"
    async with Store([rbac_etcd.endpoint], cluster_name, auth=auth, timeout_s=2) as store:
        with pytest.raises(StoreUnavailable):
            await store.put(key, b"x")
    async with Store([rbac_etcd.endpoint], cluster_name, auth=Credentials("pd", "pd-pw")) as store:
        assert await store.get(key) is None


async def test_a_token_etcd_no_longer_takes_is_replaced_by_authenticating_again(rbac_etcd, cluster_name):
    """Turning auth off and on again invalidates every token ("invalid auth token"), as an
    expired one would be: the store authenticates again, once, by itself."""
    async with Store([rbac_etcd.endpoint], cluster_name, auth=Credentials("pd", "pd-pw")) as store:
        await store.put(store.keys.root + "a", b"1")
        assert store._auth is not None
        before = await store._auth.header(_never)  # the token in use
        for args in (["auth", "disable"], ["auth", "enable"]):
            assert rbac_etcd.etcdctl(*args).returncode == 0
        await store.put(store.keys.root + "a", b"2")
        assert await store._auth.header(_never) != before
        assert (await store.get(store.keys.root + "a")).value == b"2"


async def _never(creds: Credentials) -> str:
    raise AssertionError("no authentication expected here")
