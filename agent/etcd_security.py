"""How the agent reaches etcd: TLS, RBAC, and the rule against plaintext off loopback.

Whoever can write etcd runs code as root on every node (assignments are executed), so an
agent refuses to reach etcd, or to serve its embedded etcd, without TLS off loopback unless
`allow_plaintext_etcd` says so; then it warns at every start.
"""

from __future__ import annotations

from agent.config import AgentConfig, ConfigError
from agent.lease import store_timeout
from pdsupervisor.core.addresses import is_loopback
from pdsupervisor.core.etcd_access import plaintext_remote
from pdsupervisor.core.models import EtcdAccess, TlsFiles
from pdsupervisor.host.pki import certificate_names
from pdsupervisor.store.etcd import Store
from pdsupervisor.store.transport import Credentials, CredentialsError, files_fingerprint, read_password, tls_context

PLAINTEXT_FIX = ("set etcd_tls {ca_file, cert_file, key_file} (and on the bootstrap node bootstrap_etcd.cert_file "
                 "and key_file; see `pdsupervisor pki`), or allow_plaintext_etcd: true to accept it")


def server_tls(config: AgentConfig) -> TlsFiles | None:
    """The embedded etcd's TLS files (its server certificate, the CA), when it serves TLS."""
    b = config.bootstrap_etcd
    if config.etcd_tls is None or not (b.cert_file and b.key_file):
        return None
    return TlsFiles(ca_file=config.etcd_tls.ca_file, cert_file=b.cert_file, key_file=b.key_file)


def plaintext_etcd(config: AgentConfig) -> list[tuple[str, str]]:
    """(field, what) for each way etcd would be reached or served without TLS off loopback."""
    found = [("etcd", f"endpoint {url} is plaintext and not loopback")
             for url in plaintext_remote(config.etcd, tls=config.etcd_tls is not None)]
    b = config.bootstrap_etcd
    host = b.members.get(config.name) or b.client_host or config.ip  # None: the probed first non-loopback address
    if b.enabled and server_tls(config) is None and not (host and is_loopback(host)):
        found.append(("bootstrap_etcd", f"the embedded etcd would serve plaintext on {host or 'the advertise IP'}"))
    return found


def check_etcd_security(config: AgentConfig, source: str) -> list[str]:
    """ConfigError for plaintext etcd off loopback (unless `allow_plaintext_etcd`) or an
    incomplete TLS setting; else the warnings to log at every start."""
    def refuse(*lines: str) -> ConfigError:
        return ConfigError("\n".join([f"invalid agent configuration ({source}):", *(f"  {x}" for x in lines)]))

    b = config.bootstrap_etcd
    if bool(b.cert_file) != bool(b.key_file) or (b.cert_file and config.etcd_tls is None):
        raise refuse("bootstrap_etcd.cert_file: the embedded etcd's certificate needs its key_file, and etcd_tls "
                     "(its ca_file is the CA clients are checked against)")
    if b.enabled and config.etcd_tls is not None and not b.cert_file:
        raise refuse("bootstrap_etcd.cert_file: with etcd_tls the embedded etcd needs the node's server certificate "
                     "and key (bootstrap_etcd.cert_file, key_file)")
    host = b.members.get(config.name)
    names = certificate_names(b.cert_file) if b.enabled and host and b.cert_file else None
    if names is not None and host not in names:
        raise refuse(f"bootstrap_etcd.cert_file: {b.cert_file} is not valid for {host}, this member's address in "
                     f"bootstrap_etcd.members (it names {', '.join(names) or 'nothing'}): the other members and "
                     f"clients would refuse it; issue one: pdsupervisor pki add-node DIR {config.name}={host} --replace")
    lines = [f"{field}: {what}" for field, what in plaintext_etcd(config)]
    if lines and not config.allow_plaintext_etcd:
        raise refuse(*lines, f"fix: {PLAINTEXT_FIX}")
    return [f"{x} (allowed by allow_plaintext_etcd)" for x in lines]


def etcd_access(config: AgentConfig) -> EtcdAccess | None:
    """The paths of this node's etcd credentials, registered in its facts for the built-in
    proxy, with a digest of the certificates (a proxy planned here restarts when they are
    replaced). None without TLS or RBAC."""
    tls, auth = config.etcd_tls, config.etcd_auth
    if tls is None and auth is None:
        return None
    return EtcdAccess(tls=tls, username=auth.username if auth else None, password_file=auth.password_file if auth else None,
                      fingerprint=files_fingerprint(tls.ca_file, tls.cert_file) if tls else None)


def etcd_store(config: AgentConfig) -> Store:
    """The agent's Store, its TLS and RBAC credentials read now (ConfigError naming the field
    when a file cannot be used)."""
    try:
        tls = tls_context(config.etcd_tls)
    except CredentialsError as exc:
        raise ConfigError(f"invalid agent configuration:\n  etcd_tls: {exc}") from None
    auth = None
    if config.etcd_auth is not None:
        try:
            auth = Credentials(config.etcd_auth.username, read_password(config.etcd_auth.password_file))
        except CredentialsError as exc:
            raise ConfigError(f"invalid agent configuration:\n  etcd_auth.password_file: {exc}") from None
    return Store(config.etcd, config.cluster, timeout_s=store_timeout(config.ttl), tls=tls, auth=auth)
