"""Pure rules about reaching etcd: which scheme an endpoint speaks, whether it stays on this
host."""

from __future__ import annotations

import ipaddress


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


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: traffic that never leaves the host."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_remote(endpoints: list[str], *, tls: bool) -> list[str]:
    """The endpoints (as URLs) that would be reached without TLS off loopback."""
    out = []
    for endpoint in endpoints:
        url = endpoint_url(endpoint, tls=tls)
        if not url.lower().startswith("https://") and not is_loopback(endpoint_host(url)):
            out.append(url)
    return out

