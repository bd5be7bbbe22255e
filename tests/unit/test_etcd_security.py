"""etcd over TLS, the pure parts: the embedded etcd's argv, endpoint schemes and loopback,
the agent configuration's plaintext rule, the built-in proxy's credential flags, and which
gateway answers ask for a new RBAC token."""

from __future__ import annotations

import json

import pytest
import yaml

from agent.config import ConfigError, load_config
from agent.etcd_security import etcd_access
from pdsupervisor.core.addresses import is_loopback
from pdsupervisor.core.etcd_access import endpoint_url, plaintext_remote, proxy_etcd_args
from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.core.models import EtcdAccess, NodeFacts, TlsFiles
from pdsupervisor.core.planner import plan_cluster
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.store.transport import token_rejected
from tests.unit.test_planner import example_doc, seed_nodes

SERVER = TlsFiles(ca_file="/pki/ca.crt", cert_file="/pki/server.crt", key_file="/pki/server.key")
CLIENT = TlsFiles(ca_file="/pki/ca.crt", cert_file="/pki/client.crt", key_file="/pki/client.key")


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
    assert endpoint_url("h:1", tls=True) == "https://h:1" and endpoint_url("h:1", tls=False) == "http://h:1"
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


def test_the_builtin_proxy_gets_its_nodes_etcd_credentials_as_paths():
    access = EtcdAccess(tls=CLIENT, username="pd", password_file="/etc/pd/etcd-password")
    assert proxy_etcd_args(access) == ["--etcd-ca", "/pki/ca.crt", "--etcd-cert", "/pki/client.crt",
                                       "--etcd-key", "/pki/client.key", "--etcd-user", "pd",
                                       "--etcd-password-file", "/etc/pd/etcd-password"]
    assert proxy_etcd_args(None) == [] and proxy_etcd_args(EtcdAccess()) == []
    doc = example_doc()
    doc["proxy"] = {"kind": "builtin", "extra_args": ["--policy", "round-robin"]}
    plan = plan_cluster(validate_spec(doc), seed_nodes(etcd_access=EtcdAccess(tls=CLIENT, fingerprint="f1")))
    proxy = plan.nodes["g10"].processes[-1]
    argv = proxy.argv
    # a replaced certificate changes the proxy's spec, so its agent restarts it with the new files
    assert proxy.env == {"PDSUPERVISOR_ETCD_TLS": "f1"}
    rotated = plan_cluster(validate_spec(doc), seed_nodes(etcd_access=EtcdAccess(tls=CLIENT, fingerprint="f2")))
    assert rotated.nodes["g10"].processes[-1].spec_hash() != proxy.spec_hash()
    assert argv[argv.index("--etcd-ca"):argv.index("--etcd-ca") + 6] == [
        "--etcd-ca", "/pki/ca.crt", "--etcd-cert", "/pki/client.crt", "--etcd-key", "/pki/client.key"]
    assert argv[-2:] == ["--policy", "round-robin"]
    # without credentials in its facts (an agent without etcd_tls): no flags
    plain = plan_cluster(validate_spec(doc), seed_nodes()).nodes["g10"].processes[-1].argv
    assert "--etcd-ca" not in plain


def test_node_facts_carry_paths_never_secrets():
    facts = NodeFacts(name="g10", ip="10.0.0.9", etcd_access=EtcdAccess(tls=CLIENT, username="pd",
                                                                       password_file="/etc/pd/pw"))
    assert set(json.loads(facts.model_dump_json())["etcd_access"]) == {"tls", "username", "password_file", "fingerprint"}


# ---- the agent configuration's rule --------------------------------------------------------

def _load(tmp_path, doc: dict):
    p = tmp_path / "agent.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_config(str(p))


TLS = {"ca_file": "/pki/ca.crt", "cert_file": "/pki/client.crt", "key_file": "/pki/client.key"}


@pytest.mark.parametrize("doc, field", [
    ({"etcd": ["10.0.0.9:2379"]}, "etcd: endpoint http://10.0.0.9:2379 is plaintext"),
    ({"etcd": ["http://10.0.0.9:2379"], "etcd_tls": TLS}, "etcd: endpoint http://10.0.0.9:2379 is plaintext"),
    ({"ip": "10.0.0.9", "bootstrap_etcd": {"enabled": True}}, "bootstrap_etcd: the embedded etcd would serve plaintext"),
    ({"bootstrap_etcd": {"enabled": True}}, "bootstrap_etcd: the embedded etcd would serve plaintext"),  # ip: probed
])
def test_plaintext_etcd_off_loopback_is_refused_naming_the_field_and_the_fix(tmp_path, doc, field):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, doc)
    assert field in str(e.value)
    assert "etcd_tls" in str(e.value) and "allow_plaintext_etcd: true" in str(e.value)


@pytest.mark.parametrize("doc", [
    {},  # 127.0.0.1:2379
    {"etcd": ["127.0.0.2:2379", "http://[::1]:2379", "localhost:2379"]},
    {"ip": "127.0.0.1", "bootstrap_etcd": {"enabled": True}},
    {"etcd": ["10.0.0.9:2379"], "etcd_tls": TLS},
    {"ip": "10.0.0.9", "etcd": ["10.0.0.9:2379"], "etcd_tls": TLS,
     "bootstrap_etcd": {"enabled": True, "cert_file": "/pki/server.crt", "key_file": "/pki/server.key"}},
    {"etcd": ["10.0.0.9:2379"], "allow_plaintext_etcd": True},
])
def test_loopback_tls_or_allowed_plaintext_is_accepted(tmp_path, doc):
    _load(tmp_path, doc)


def test_tls_bootstrap_needs_the_servers_certificate(tmp_path):
    with pytest.raises(ConfigError, match=r"bootstrap_etcd\.cert_file"):
        _load(tmp_path, {"ip": "10.0.0.9", "etcd": ["10.0.0.9:2379"], "etcd_tls": TLS, "bootstrap_etcd": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"bootstrap_etcd\.cert_file"):  # a server certificate without a CA
        _load(tmp_path, {"bootstrap_etcd": {"cert_file": "/pki/server.crt", "key_file": "/pki/server.key"}})


def test_etcd_tls_and_auth_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"etcd_tls\.key_file"):
        _load(tmp_path, {"etcd_tls": {"ca_file": "a", "cert_file": "b"}})
    with pytest.raises(ConfigError, match=r"etcd_auth\.pasword_file: unknown field"):
        _load(tmp_path, {"etcd_auth": {"username": "pd", "pasword_file": "/x"}})
    cfg = _load(tmp_path, {"etcd_auth": {"username": "pd", "password_file": "/etc/pd/pw"}, "etcd_tls": TLS})
    # what its facts carry for the built-in proxy: paths (no digest: these files do not exist)
    assert etcd_access(cfg) == EtcdAccess(tls=TlsFiles(**TLS), username="pd", password_file="/etc/pd/pw")
