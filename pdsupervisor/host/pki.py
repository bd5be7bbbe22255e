"""The cluster PKI on disk: a CA, and per node an etcd server and client certificate.

ECDSA P-256 keys (what etcd's Go TLS and Python's OpenSSL both take), SHA-256 signatures,
keys as unencrypted PKCS#8 PEM files 0600 in directories 0700. Names, SANs and the layout
are `pdsupervisor.core.pki`'s. An existing CA is never overwritten; a leaf is re-issued
(rotation, same CA) only when asked (`replace`).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdsupervisor.core import pki
from pdsupervisor.host.private import UnsafePath, private_dir, write_file

CERT_MODE = 0o644  # certificates are public; they sit in 0700 directories anyway
KEY_MODE = 0o600
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid a little before now: nodes' clocks differ


class PkiError(Exception):
    """The PKI directory cannot be used as asked (a CA exists, none exists, a file is in the way)."""


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass
class Written:
    """What one call wrote, for the command to print."""

    root: Path
    files: list[Path] = field(default_factory=list)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str, days: int = pki.CA_DAYS) -> Ca:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(cert, key)


def issue(ca: Ca, profile: pki.LeafProfile, days: int = pki.LEAF_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for `profile`, signed by `ca`, and its new key."""
    key = _key()
    now = _now()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if profile.server else []) + [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, profile.common_name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in profile.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in profile.ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def load_ca(root: str | Path) -> Ca:
    root = Path(root)
    try:
        cert = x509.load_pem_x509_certificate((root / pki.CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((root / pki.CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {root} ({exc.filename} is missing): run `pdsupervisor pki init {root}` first") from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the CA in {root}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{root / pki.CA_KEY}: not an ECDSA key")
    return Ca(cert, key)


def _write_pair(directory: Path, cert_name: str, key_name: str, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey, replace: bool, out: Written) -> None:
    for name, data, mode in ((key_name, _key_pem(key), KEY_MODE), (cert_name, _cert_pem(cert), CERT_MODE)):
        path = directory / name
        try:
            write_file(path, data, mode, replace=replace)
        except FileExistsError:
            raise PkiError(f"{path} exists; pass --replace to issue it again with the same CA") from None
        out.files.append(path)


def _bundle(root: Path, directory: Path, out: Written) -> None:
    """A copy of the root's `ca.crt` as it is now: the CA's certificate, or two CAs' while
    one replaces the other (see the README)."""
    path = directory / pki.CA_CERT
    write_file(path, (root / pki.CA_CERT).read_bytes(), CERT_MODE, replace=True)
    out.files.append(path)


def _leaf_dir(root: Path, rel: Path, replace: bool) -> Path:
    directory = root / rel
    if (directory.exists() or directory.is_symlink()) and not replace:
        raise PkiError(f"{directory} exists; pass --replace to issue its certificates again with the same CA")
    _private(directory.parent)
    return _private(directory)


def add_node(root: str | Path, node: pki.NodeId, *, replace: bool = False, days: int = pki.LEAF_DAYS) -> Written:
    """`nodes/<name>/`: the bundle, the server certificate (SANs: name, IP, localhost,
    127.0.0.1) and the client certificate (CN = name), signed by the CA in `root`."""
    root = _private(root)
    ca = load_ca(root)
    out = Written(root)
    directory = _leaf_dir(root, Path(pki.node_dir(node.name)), replace)
    _bundle(root, directory, out)
    _write_pair(directory, pki.SERVER_CERT, pki.SERVER_KEY, *issue(ca, pki.server_profile(node), days), replace, out)
    _write_pair(directory, pki.CLIENT_CERT, pki.CLIENT_KEY, *issue(ca, pki.client_profile(node.name), days), replace, out)
    return out


def add_client(root: str | Path, name: str, *, replace: bool = False, days: int = pki.LEAF_DAYS) -> Written:
    """`clients/<name>/`: the bundle and a client certificate (CN = name)."""
    root = _private(root)
    ca = load_ca(root)
    out = Written(root)
    directory = _leaf_dir(root, Path(pki.client_dir(name)), replace)
    _bundle(root, directory, out)
    _write_pair(directory, pki.CLIENT_CERT, pki.CLIENT_KEY, *issue(ca, pki.client_profile(name), days), replace, out)
    return out


def init(root: str | Path, nodes: list[pki.NodeId], *, ca_name: str | None = None, ca_days: int = pki.CA_DAYS,
         days: int = pki.LEAF_DAYS) -> Written:
    """A new CA in `root` (refused if one is there), each node's certificates and `admin`'s."""
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise PkiError(f"a node named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    root = _private(root)
    for name in (pki.CA_KEY, pki.CA_CERT):
        if (root / name).exists() or (root / name).is_symlink():
            raise PkiError(f"{root / name} exists: refusing to replace a CA (its certificates would stop "
                           "working); use `pki add-node` to add nodes, or another directory for a new CA")
    ca = make_ca(ca_name or f"pdsupervisor CA {_now():%Y-%m-%d %H:%M:%S}", ca_days)
    out = Written(root)
    try:  # the key first: a CA certificate without its key would be useless
        write_file(root / pki.CA_KEY, _key_pem(ca.key), KEY_MODE)
        out.files.append(root / pki.CA_KEY)
        write_file(root / pki.CA_CERT, _cert_pem(ca.cert), CERT_MODE)
        out.files.append(root / pki.CA_CERT)
    except FileExistsError as exc:
        raise PkiError(f"{exc.filename} appeared while the CA was being written; refusing to replace it") from None
    for node in nodes:
        out.files += add_node(root, node, days=days).files
    out.files += add_client(root, pki.ADMIN, days=days).files
    return out


def _private(root: str | Path) -> Path:
    try:
        return private_dir(root)
    except UnsafePath as exc:
        raise PkiError(str(exc)) from None
    except OSError as exc:
        raise PkiError(f"cannot use {root}: {exc}") from None


def certificate_names(path: str | Path) -> list[str] | None:
    """The DNS names and IP addresses a PEM certificate is valid for (its SANs); None when the
    file cannot be read as one (the caller's other checks say why)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    return [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]
