"""The command line of an embedded etcd member (argv only: the binary is the caller's to find)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pdsupervisor.core.models import TlsFiles


def peer_url(host: str, peer_port: int, *, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{host}:{peer_port}"


def initial_cluster(members: Mapping[str, str], peer_port: int, *, tls: bool) -> str:
    """etcd's `--initial-cluster`: `name=peer URL,...` from member name -> host."""
    return ",".join(f"{name}={peer_url(host, peer_port, tls=tls)}" for name, host in members.items())


def cluster_token(cluster: str) -> str:
    """The initial-cluster token: members of two clusters started with the same member list
    (the demo and a bench on one machine) refuse each other instead of merging."""
    return f"pdsupervisor-{cluster}"


def etcd_argv(
    *,
    name: str,
    data_dir: str,
    client_host: str,
    client_port: int = 2379,
    peer_port: int = 2380,
    extra: list[str] | None = None,
    binary: str,
    tls: TlsFiles | None = None,
    members: Mapping[str, str] | None = None,
    state: Literal["new", "existing"] = "new",
    token: str | None = None,
) -> list[str]:
    """An etcd member listening for clients on `client_host:client_port` (and 127.0.0.1).

    Without `members` a one-member cluster; with them (member name -> host, `name` among them,
    every member on the same ports) one member of that cluster, `state` new or existing, under
    `token`. etcd reads these only to create an empty data dir: a member with data rejoins as it was.

    With `tls` (the node's server certificate and key, the trusted CA bundle) clients and
    peers speak TLS and must present a certificate signed by that CA: whoever can write a
    key can run code as root on every node, so nobody without one gets in.
    """
    scheme = "https" if tls else "http"
    client_url = f"{scheme}://{client_host}:{client_port}"
    own_peer = peer_url(client_host, peer_port, tls=tls is not None)
    if members is not None and name not in members:
        raise ValueError(f"member {name!r} is not in the member list ({', '.join(members)})")
    cluster = (initial_cluster(members, peer_port, tls=tls is not None) if members else f"{name}={own_peer}")
    join = ["--initial-cluster-token", token] if members and token else []
    # Also on loopback, so `127.0.0.1:<port>` (the agent's default endpoint, etcdctl) reaches it.
    listen = [client_url] + ([f"{scheme}://127.0.0.1:{client_port}"] if not client_host.startswith("127.") else [])
    security = [] if tls is None else [
        "--client-cert-auth", "--trusted-ca-file", tls.ca_file, "--cert-file", tls.cert_file, "--key-file", tls.key_file,
        "--peer-client-cert-auth", "--peer-trusted-ca-file", tls.ca_file,
        "--peer-cert-file", tls.cert_file, "--peer-key-file", tls.key_file,
    ]
    return [
        binary,
        "--name", name,
        "--data-dir", data_dir,
        "--listen-client-urls", ",".join(listen),
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", own_peer,
        "--initial-advertise-peer-urls", own_peer,
        "--initial-cluster", cluster,
        "--initial-cluster-state", state if members else "new",
        *join,
        "--log-level", "warn",
        # Status heartbeats and events keep adding revisions: without compaction the backend
        # reaches its quota in weeks and etcd refuses every write (NOSPACE).
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
        *security,
        *(extra or []),
    ]
