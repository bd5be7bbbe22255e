"""Pure rules about reaching etcd: which scheme an endpoint speaks, whether it stays on this
host, and the flags that hand a node's etcd credentials (paths) to the built-in proxy."""

from __future__ import annotations

from pdsupervisor.core.addresses import is_loopback
from pdsupervisor.core.models import EtcdAccess

# In the env of a process that reads etcd certificates (the embedded etcd, the built-in proxy):
# their digest, so that replaced files change the process's spec and it restarts to read them.
TLS_FINGERPRINT_ENV = "PDSUPERVISOR_ETCD_TLS"


def endpoint_url(endpoint: str, *, tls: bool) -> str:
    """`host:port` -> `https://host:port` with TLS, else `http://`; a scheme given is kept."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else ("https://" if tls else "http://") + endpoint


def endpoint_host(endpoint: str) -> str:
    """The host of `host:port`, `[v6]:port` or `scheme://host:port/...`."""
    rest = endpoint.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def plaintext_remote(endpoints: list[str], *, tls: bool) -> list[str]:
    """The endpoints (as URLs) that would be reached without TLS off loopback."""
    out = []
    for endpoint in endpoints:
        url = endpoint_url(endpoint, tls=tls)
        if not url.lower().startswith("https://") and not is_loopback(endpoint_host(url)):
            out.append(url)
    return out


def proxy_etcd_env(access: EtcdAccess | None) -> dict[str, str]:
    """The built-in proxy's env for `access`: the certificates' digest, if known."""
    return {TLS_FINGERPRINT_ENV: access.fingerprint} if access is not None and access.fingerprint else {}


def proxy_etcd_args(access: EtcdAccess | None) -> list[str]:
    """The built-in proxy's flags for `access` (the files stay on the node; only paths travel)."""
    if access is None:
        return []
    args: list[str] = []
    if access.tls is not None:
        args += ["--etcd-ca", access.tls.ca_file, "--etcd-cert", access.tls.cert_file, "--etcd-key", access.tls.key_file]
    if access.username:
        args += ["--etcd-user", access.username]
        if access.password_file:
            args += ["--etcd-password-file", access.password_file]
    return args
