"""The cluster PKI: names and SANs (pure), files and modes, refusals (existing CA, planted
symlinks, directories others can write), re-issue with the same CA, and the command."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdsupervisor.cli.main import main as cli
from pdsupervisor.core import pki
from pdsupervisor.host import pki as pki_files
from pdsupervisor.host.private import UnsafePath, open_lock, private_dir

NODES = [pki.NodeId("g10", "10.0.0.9"), pki.NodeId("g13", "10.0.0.81")]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---- pure naming ----------------------------------------------------------------------

def test_parse_node_and_names():
    assert pki.parse_node("g10=10.0.0.9") == pki.NodeId("g10", "10.0.0.9")
    assert pki.parse_node("v6=[fd00::2]") == pki.NodeId("v6", "fd00::2")
    for bad in ("g10", "=1.2.3.4", "g10=", "g10=10.0.0.300", "../x=1.2.3.4", "a/b=1.2.3.4", ".hidden=1.2.3.4"):
        with pytest.raises(ValueError):
            pki.parse_node(bad)


def test_server_profile_names_the_node_its_ip_and_loopback():
    p = pki.server_profile(pki.NodeId("g10", "10.0.0.9"))
    assert (p.common_name, p.dns_names, p.ip_addresses) == ("g10", ("g10", "localhost"), ("10.0.0.9", "127.0.0.1"))
    assert p.server and p.client  # etcd peers present their server certificate as clients too
    assert pki.server_profile(pki.NodeId("n1", "127.0.0.1")).ip_addresses == ("127.0.0.1",)  # no duplicate
    c = pki.client_profile("g10")
    assert (c.common_name, c.dns_names, c.ip_addresses, c.server, c.client) == ("g10", (), (), False, True)


# ---- files ----------------------------------------------------------------------------

def test_init_writes_a_ca_and_each_nodes_and_admins_certificates(tmp_path):
    root = tmp_path / "pki"
    written = pki_files.init(root, NODES)
    ca = _cert(root / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    ca_years = (ca.not_valid_after_utc - ca.not_valid_before_utc) / datetime.timedelta(days=365)
    assert 9.9 < ca_years < 10.1
    for node in NODES:
        d = root / "nodes" / node.name
        server, client = _cert(d / "server.crt"), _cert(d / "client.crt")
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [node.name, "localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(node.ip), ipaddress.ip_address("127.0.0.1")]
        assert _eku(server) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert _cn(server) == node.name and _cn(client) == node.name
        assert _eku(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not client.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        leaf_days = (client.not_valid_after_utc - client.not_valid_before_utc).days
        assert 365 <= leaf_days <= 731
        assert _signed_by(server, ca) and _signed_by(client, ca)
        assert (d / "ca.crt").read_bytes() == (root / "ca.crt").read_bytes()
    admin = _cert(root / "clients" / "admin" / "client.crt")
    assert _cn(admin) == "admin" and _signed_by(admin, ca)
    assert set(written.files) == {p for p in root.rglob("*") if p.is_file()}


def test_keys_are_0600_and_directories_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        root = tmp_path / "pki"
        pki_files.init(root, NODES[:1])
    finally:
        os.umask(old)
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            assert _mode(path) == 0o700, path
        elif path.suffix == ".key":
            assert _mode(path) == 0o600, path
        else:
            assert _mode(path) == 0o644, path  # certificates: public, inside 0700 directories


def test_init_refuses_an_existing_ca_and_leaves_it_as_it_was(tmp_path):
    root = tmp_path / "pki"
    pki_files.init(root, NODES)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(pki_files.PkiError, match="refusing to replace a CA"):
        pki_files.init(root, [pki.NodeId("g99", "10.0.0.99")])
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_init_never_writes_through_a_planted_symlink(tmp_path):
    root = tmp_path / "pki"
    root.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_text("precious")
    (root / "ca.key").symlink_to(target)  # someone hopes we write the CA key there
    with pytest.raises(pki_files.PkiError, match="exists"):
        pki_files.init(root, NODES)
    assert target.read_text() == "precious"
    assert not (root / "ca.crt").exists()


def test_a_planted_symlink_for_the_directory_itself_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "pki"
    link.symlink_to(elsewhere)
    with pytest.raises(pki_files.PkiError, match="symbolic link"):
        pki_files.init(link, NODES)
    assert list(elsewhere.iterdir()) == []


def test_a_directory_others_can_write_is_refused(tmp_path):
    root = tmp_path / "pki"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(pki_files.PkiError, match="writable by group or others"):
        pki_files.init(root, NODES)
    assert list(root.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another user")
def test_a_directory_of_another_user_is_refused(tmp_path):
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        private_dir(root)


def test_add_node_uses_the_same_ca_and_refuses_to_overwrite_unless_replacing(tmp_path):
    root = tmp_path / "pki"
    pki_files.init(root, NODES)
    ca = _cert(root / "ca.crt")
    pki_files.add_node(root, pki.NodeId("g14", "10.0.0.165"))
    assert _signed_by(_cert(root / "nodes/g14/server.crt"), ca)
    old = _cert(root / "nodes/g10/server.crt")
    with pytest.raises(pki_files.PkiError, match="--replace"):
        pki_files.add_node(root, pki.NodeId("g10", "10.0.0.9"))
    assert _cert(root / "nodes/g10/server.crt") == old
    pki_files.add_node(root, pki.NodeId("g10", "10.0.0.10"), replace=True)  # rotation (and a new IP)
    new = _cert(root / "nodes/g10/server.crt")
    assert new.serial_number != old.serial_number and _signed_by(new, ca)
    assert ipaddress.ip_address("10.0.0.10") in new.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert _mode(root / "nodes/g10/server.key") == 0o600
    pki_files.add_client(root, "admin", replace=True)
    assert _signed_by(_cert(root / "clients/admin/client.crt"), ca)


def test_add_node_without_a_ca_says_to_init_first(tmp_path):
    with pytest.raises(pki_files.PkiError, match="pki init"):
        pki_files.add_node(tmp_path / "none", pki.NodeId("g10", "10.0.0.9"))


def test_private_dir_makes_0700_and_tightens_our_own(tmp_path):
    made = private_dir(tmp_path / "a" / "b")
    assert _mode(made) == 0o700
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    assert _mode(private_dir(mine)) == 0o700


def test_open_lock_refuses_a_planted_symlink(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious")
    (tmp_path / "demo.lock").symlink_to(target)
    with pytest.raises(UnsafePath, match="symbolic link"):
        open_lock(tmp_path / "demo.lock")
    assert target.read_text() == "precious"
    fd = open_lock(tmp_path / "fresh.lock")
    os.close(fd)
    assert _mode(tmp_path / "fresh.lock") == 0o600


# ---- the command -----------------------------------------------------------------------

def test_pki_commands(tmp_path):
    root = tmp_path / "pki"
    run = CliRunner().invoke
    out = run(cli, ["pki", "init", str(root), "--node", "g10=10.0.0.9", "--node", "g13=10.0.0.81"])
    assert out.exit_code == 0, out.output
    assert "ca.key" in out.output and "nodes/g10" in out.output
    again = run(cli, ["pki", "init", str(root), "--node", "g10=10.0.0.9"])
    assert again.exit_code == 1 and "refusing to replace a CA" in again.output
    assert run(cli, ["pki", "add-node", str(root), "g14=10.0.0.165"]).exit_code == 0
    assert (root / "nodes/g14/client.key").exists()
    bad = run(cli, ["pki", "add-node", str(root), "g15"])
    assert bad.exit_code == 2 and "expected NAME=IP" in bad.output
    assert run(cli, ["pki", "add-client", str(root), "ops"]).exit_code == 0
    assert _cn(_cert(root / "clients/ops/client.crt")) == "ops"
