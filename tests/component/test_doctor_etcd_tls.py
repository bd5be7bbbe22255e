"""`pdsupervisor doctor` against a real etcd over TLS with client-certificate auth: its etcd
check goes through the store, with `--etcd-ca`, `--etcd-cert` and `--etcd-key`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pdsupervisor.cli.main import main
from tests.unit.test_doctor import by_check, doctor, host_tree, spec_file


@pytest.fixture
def check(tmp_path, tls_etcd):
    """doctor on a healthy fake host whose spec names the TLS etcd: (exit code, etcd, clock)."""
    root = host_tree(tmp_path / "root", thp="[always]", total=32768, free=32768)
    (tmp_path / "model").mkdir()
    spec = spec_file(tmp_path, etcd={"endpoints": [tls_etcd.endpoint]})

    def run(*options: str) -> tuple[int, dict, dict]:
        code, doc = doctor(root, spec, *options)
        checks = by_check(doc)
        return code, checks["etcd"], checks["clock"]

    return run


def _files(files) -> list[str]:
    return ["--etcd-ca", files.ca_file, "--etcd-cert", files.cert_file, "--etcd-key", files.key_file]


def test_doctor_reaches_a_tls_etcd_with_the_nodes_certificate(check, tls_etcd, pkis):
    code, etcd, clock = check(*_files(pkis.admin))
    assert etcd["status"] == "OK", etcd
    assert etcd["found"].startswith(f"https://{tls_etcd.endpoint} 3.")  # the URL asked, etcd's version
    assert clock["status"] == "OK" and f"against https://{tls_etcd.endpoint}" in clock["found"]
    assert code == 0


@pytest.mark.parametrize("who", ["no client certificate", "a certificate of another CA"])
def test_doctor_is_refused_without_a_client_certificate_of_etcds_ca(check, tls_etcd, pkis, who):
    options = (["--etcd-ca", pkis.admin.ca_file] if who == "no client certificate"
               else ["--etcd-ca", pkis.admin.ca_file, "--etcd-cert", pkis.stranger.cert_file,
                     "--etcd-key", pkis.stranger.key_file])
    code, etcd, clock = check(*options)
    assert etcd["status"] == "FAIL" and code == 1, etcd
    assert etcd["found"].startswith(f"etcd at https://{tls_etcd.endpoint}: it refused this client's certificate")
    assert "--etcd-cert" in etcd["fix"] and "client.crt" in etcd["fix"]
    assert clock["found"] == "not measured (etcd unreachable)"


def test_doctor_refuses_an_etcd_its_ca_bundle_did_not_sign(check, pkis):
    code, etcd, _ = check("--etcd-ca", pkis.stranger.ca_file, "--etcd-cert", pkis.admin.cert_file,
                          "--etcd-key", pkis.admin.key_file)
    assert etcd["status"] == "FAIL" and code == 1
    assert "its certificate is not one the CA bundle trusts" in etcd["found"]


def test_doctor_without_tls_options_says_how_to_reach_a_tls_etcd(check, tls_etcd):
    code, etcd, _ = check()
    assert etcd["status"] == "WARN" and f"http://{tls_etcd.endpoint}" in etcd["found"]
    assert "A TLS etcd: give --etcd-ca, --etcd-cert and --etcd-key" in etcd["fix"]
    assert code == 0


@pytest.mark.parametrize(("options", "words"), [
    (["--etcd-cert", "CERT"], "--etcd-cert and --etcd-key go together"),
    (["--etcd-cert", "CERT", "--etcd-key", "KEY"], "--etcd-cert needs --etcd-ca"),
])
def test_doctor_tls_options_go_together(tmp_path, pkis, options, words):
    files = {"CERT": pkis.admin.cert_file, "KEY": pkis.admin.key_file}
    args = ["doctor", "-f", str(spec_file(tmp_path)), "--root", str(tmp_path), *[files.get(o, o) for o in options]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and words in result.output
