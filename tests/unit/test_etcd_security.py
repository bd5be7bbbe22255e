"""etcd over TLS, the pure parts: the embedded etcd's argv, endpoint schemes and loopback, and
which gateway answers ask for a new RBAC token."""

from __future__ import annotations

import json

from pdsupervisor.core.etcd_access import endpoint_url, is_loopback, plaintext_remote
from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.core.models import TlsFiles
from pdsupervisor.store.gateway import parse_endpoint
from pdsupervisor.store.transport import token_rejected

SERVER = TlsFiles(ca_file="/pki/ca.crt", cert_file="/pki/server.crt", key_file="/pki/server.key")


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_etcd_argv_with_tls_serves_https_and_requires_client_certificates():
    argv = etcd_argv(name="g10", data_dir="/d", client_host="10.0.0.9", client_port=2379, peer_port=2380,
                     binary="etcd", tls=SERVER)
    assert _flag(argv, "--listen-client-urls") == "https://10.0.0.9:2379,https://127.0.0.1:2379"  # node IP, loopback
    assert _flag(argv, "--advertise-client-urls") == "https://10.0.0.9:2379"
    assert _flag(argv, "--listen-peer-urls") == "https://10.0.0.9:2380"
    assert _flag(argv, "--initial-cluster") == "g10=https://10.0.0.9:2380"
    assert "--client-cert-auth" in argv and "--peer-client-cert-auth" in argv
    assert (_flag(argv, "--trusted-ca-file"), _flag(argv, "--cert-file"), _flag(argv, "--key-file")) == (
        "/pki/ca.crt", "/pki/server.crt", "/pki/server.key")
    assert (_flag(argv, "--peer-trusted-ca-file"), _flag(argv, "--peer-cert-file"), _flag(argv, "--peer-key-file")) == (
        "/pki/ca.crt", "/pki/server.crt", "/pki/server.key")
    assert not any("0.0.0.0" in a for a in argv)


def test_etcd_argv_without_tls_is_unchanged_plaintext():
    argv = etcd_argv(name="t", data_dir="/d", client_host="127.0.0.1", binary="etcd")
    assert _flag(argv, "--listen-client-urls") == "http://127.0.0.1:2379"
    assert not any(a.startswith("--") and "cert" in a for a in argv)


def test_endpoint_schemes_and_loopback():
    assert endpoint_url("10.0.0.9:2379", tls=True) == "https://10.0.0.9:2379"
    assert endpoint_url("10.0.0.9:2379", tls=False) == "http://10.0.0.9:2379"
    assert endpoint_url("http://10.0.0.9:2379/", tls=True) == "http://10.0.0.9:2379"  # a scheme given is kept
    assert parse_endpoint("h:1", tls=True) == "https://h:1" and parse_endpoint("h:1") == "http://h:1"
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("10.0.0.9", "0.0.0.0", "g10", "fd00::2"))
    endpoints = ["127.0.0.2:2379", "10.0.0.9:2379", "http://[::1]:2379", "https://10.0.0.8:2379", "http://g10:2379"]
    assert plaintext_remote(endpoints, tls=False) == ["http://10.0.0.9:2379", "http://g10:2379"]
    assert plaintext_remote(endpoints, tls=True) == ["http://g10:2379"]


def test_token_rejections_ask_for_a_new_token_other_errors_do_not():
    def body(code: int, text: str) -> bytes:
        return json.dumps({"error": text, "code": code, "message": text}).encode()

    assert token_rejected(401, body(16, "etcdserver: invalid auth token"))
    assert token_rejected(400, body(3, "etcdserver: revision of auth store is old"))
    assert token_rejected(400, body(3, "etcdserver: user name is empty"))
    assert not token_rejected(400, body(3, "etcdserver: authentication failed, invalid user ID or password"))
    assert not token_rejected(403, body(7, "etcdserver: permission denied"))
    assert not token_rejected(500, b"not json")
