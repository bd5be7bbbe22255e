"""A several-member embedded etcd: the member list in the agent configuration, and the argv."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, load_config
from pdsupervisor.core.etcd_command import cluster_token, etcd_argv, initial_cluster

MEMBERS = {"node1": "127.0.0.1", "node2": "127.0.0.2", "node3": "127.0.0.3"}


def _config(name: str, **boot):
    return load_config(None, {"name": name, "cluster": "c1", "bootstrap_etcd": {"members": MEMBERS, **boot}})


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_a_named_node_runs_a_member_and_every_agent_lists_every_member():
    cfg = _config("node2", client_port=3379, peer_port=3380)
    assert cfg.bootstrap_etcd.enabled
    assert cfg.etcd == ["127.0.0.1:3379", "127.0.0.2:3379", "127.0.0.3:3379"]
    other = load_config(None, {"name": "node9", "bootstrap_etcd": {"members": MEMBERS}})
    assert not other.bootstrap_etcd.enabled and len(other.etcd) == 3  # not a member: a client of all three


def test_explicit_endpoints_win_over_the_member_list():
    cfg = load_config(None, {"name": "node1", "etcd": ["127.0.0.9:2379"], "bootstrap_etcd": {"members": MEMBERS}})
    assert cfg.etcd == ["127.0.0.9:2379"]


def test_without_members_nothing_changes():
    cfg = load_config(None, {"name": "n", "bootstrap_etcd": {"enabled": True, "client_host": "127.0.0.1"}})
    assert cfg.bootstrap_etcd.members == {} and cfg.etcd == ["127.0.0.1:2379"]
    argv = etcd_argv(name="n", data_dir="/d", client_host="127.0.0.1", binary="etcd", token="x")
    assert _flag(argv, "--initial-cluster") == "n=http://127.0.0.1:2380" and "--initial-cluster-token" not in argv
    assert _flag(argv, "--initial-cluster-state") == "new"


@pytest.mark.parametrize(("boot", "name", "field", "words"), [
    ({"enabled": True}, "node9", "<root>", "this node (node9) runs an etcd member"),
    ({"initial_cluster_state": "existing", "members": {}}, "node1", "bootstrap_etcd", "needs members"),
    ({"members": {"node1": "127.0.0.1:2380"}}, "node1", "bootstrap_etcd.members", "not a host name"),
    ({"members": {"a=b": "127.0.0.1"}}, "node1", "bootstrap_etcd.members", "member name 'a=b'"),
    ({"members": {"a": "127.0.0.1", "b": "127.0.0.1"}}, "a", "bootstrap_etcd.members", "two members on one host"),
    ({"initial_cluster_state": "later"}, "node1", "bootstrap_etcd.initial_cluster_state", "'new' or 'existing'"),
    ({"client_host": "127.0.0.5"}, "node1", "<root>", "bootstrap_etcd.client_host"),
])
def test_bad_member_settings_are_named(boot, name, field, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"name": name, "bootstrap_etcd": {"members": MEMBERS, **boot}})
    assert f"{field}: " in str(e.value) and words in str(e.value)


def test_an_even_member_count_is_warned_about():
    two = load_config(None, {"name": "a", "bootstrap_etcd": {"members": {"a": "127.0.0.1", "b": "127.0.0.2"}}})
    assert two.etcd_member_warnings() == [
        "bootstrap_etcd.members: 2 members survive 0 lost, as 1 do, and need 2 for a quorum; use 1 or 3"]
    assert _config("node1").etcd_member_warnings() == []


def test_member_argv_names_the_whole_cluster():
    argv = etcd_argv(name="node2", data_dir="/d", client_host="127.0.0.2", client_port=3379, peer_port=3380,
                     binary="etcd", members=MEMBERS, state="existing", token=cluster_token("c1"))
    assert _flag(argv, "--initial-cluster") == initial_cluster(MEMBERS, 3380, tls=False) == (
        "node1=http://127.0.0.1:3380,node2=http://127.0.0.2:3380,node3=http://127.0.0.3:3380")
    assert _flag(argv, "--initial-advertise-peer-urls") == "http://127.0.0.2:3380"
    assert _flag(argv, "--advertise-client-urls") == "http://127.0.0.2:3379"
    assert _flag(argv, "--initial-cluster-state") == "existing"
    assert _flag(argv, "--initial-cluster-token") == "pdsupervisor-c1"
    with pytest.raises(ValueError, match="'node4' is not in the member list"):
        etcd_argv(name="node4", data_dir="/d", client_host="127.0.0.4", binary="etcd", members=MEMBERS)


def test_member_argv_with_tls_uses_https_peers():
    assert initial_cluster({"a": "10.0.0.1"}, 2380, tls=True) == "a=https://10.0.0.1:2380"


def test_a_member_certificate_must_name_the_members_address(tmp_path):
    from pdsupervisor.core.pki import CA_CERT, SERVER_CERT, SERVER_KEY, NodeId, node_dir
    from pdsupervisor.host import pki as pki_files

    pki_files.init(tmp_path, [NodeId("node1", "127.0.0.1"), NodeId("node2", "127.0.0.7")])

    def config(name: str):
        d = tmp_path / node_dir(name)
        return {"name": name, "etcd_tls": {"ca_file": str(d / CA_CERT), "cert_file": str(d / SERVER_CERT),
                                           "key_file": str(d / SERVER_KEY)},
                "bootstrap_etcd": {"members": MEMBERS, "cert_file": str(d / SERVER_CERT), "key_file": str(d / SERVER_KEY)}}

    assert load_config(None, config("node1")).bootstrap_etcd.enabled
    with pytest.raises(ConfigError) as e:
        load_config(None, config("node2"))  # issued for 127.0.0.7, a member at 127.0.0.2
    assert "bootstrap_etcd.cert_file" in str(e.value) and "not valid for 127.0.0.2" in str(e.value)
    assert "pki add-node DIR node2=127.0.0.2 --replace" in str(e.value)
