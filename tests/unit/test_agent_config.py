"""Agent configuration: the shipped file loads, typos are named, flags override the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.main import overrides_from_flags

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads():
    cfg = load_config(str(ROOT / "etc/pdsupervisor/agent.yaml"))
    assert cfg.rest.port == 8470 and cfg.ttl == 30 and cfg.etcd == ["127.0.0.1:2379"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("cluster: c\nrest:\n  prot: 1\nttll: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "rest.prot: unknown field" in str(e.value) and "ttll: unknown field" in str(e.value)


def test_bad_value_is_named(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("bootstrap_etcd:\n  client_port: nope\n")
    with pytest.raises(ConfigError, match=r"bootstrap_etcd\.client_port"):
        load_config(str(p))


def test_flags_override_file(tmp_path):
    p = tmp_path / "agent.yaml"
    # plaintext h1, h2 and a plaintext bootstrap etcd on a probed IP: allowed here, this is about flags
    p.write_text("cluster: fromfile\nname: a\nrest:\n  port: 9000\n  host: 10.0.0.1\nlabels: {x: y}\n"
                 "allow_plaintext_etcd: true\n")
    o = overrides_from_flags(name="b", etcd=("h1:1,h2:2",), listen="127.0.0.3:9100", bootstrap_etcd=True,
                             etcd_client_port=1234, label=("rack=r2",))
    cfg = load_config(str(p), o)
    assert (cfg.cluster, cfg.name, cfg.etcd) == ("fromfile", "b", ["h1:1", "h2:2"])
    assert (cfg.rest.host, cfg.rest.port) == ("127.0.0.3", 9100)
    assert cfg.bootstrap_etcd.enabled and cfg.bootstrap_etcd.client_port == 1234
    assert cfg.labels == {"x": "y", "rack": "r2"}  # nested mappings merge: flags add labels


def test_cli_reports_bad_key_and_exits_2(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("state_dri: /tmp/x\n")
    out = subprocess.run([sys.executable, "-m", "agent.main", "--config", str(p)], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2 and "state_dri: unknown field" in out.stderr


def test_allowed_commands_default_to_any_and_are_read(tmp_path):
    assert load_config(None).allowed_commands == []
    p = tmp_path / "agent.yaml"
    p.write_text("allowed_commands: [/usr/bin/python3*, /opt/bin/mooncake_master]\n")
    assert load_config(str(p)).allowed_commands == ["/usr/bin/python3*", "/opt/bin/mooncake_master"]


def test_rest_listens_on_loopback_unless_a_credential_is_configured(tmp_path):
    from agent.config import RestConfig

    assert RestConfig().bind_host == "127.0.0.1" and not RestConfig().credentialed
    token = tmp_path / "token"
    token.write_text(" t0ken \n")
    with_token = RestConfig(token_file=str(token))
    assert with_token.bind_host == "0.0.0.0" and with_token.token == "t0ken"  # read at load
    assert RestConfig(host="127.0.0.5").bind_host == "127.0.0.5"
    cfg = load_config(None, overrides_from_flags(listen=":9100"))  # no host: the default one
    assert (cfg.rest.host, cfg.rest.bind_host, cfg.rest.port) == (None, "127.0.0.1", 9100)
    with pytest.raises(ConfigError, match=r"rest: tls_client_ca needs tls_cert"):
        load_config(None, {"rest": {"tls_client_ca": str(token)}})


def test_a_token_served_over_plain_http_beyond_loopback_is_warned_about(tmp_path):
    from agent.config import RestConfig

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    in_clear = RestConfig(token_file=str(token))  # 0.0.0.0, plain HTTP
    assert any("travels in clear" in w for w in in_clear.security_warnings())
    assert not any("travels in clear" in w for w in RestConfig(token_file=str(token), host="127.0.0.1").security_warnings())
