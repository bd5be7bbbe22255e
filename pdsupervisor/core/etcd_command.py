"""The command line of a one-member etcd (argv only: the binary is the caller's to find)."""

from __future__ import annotations

from pdsupervisor.core.models import TlsFiles


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
) -> list[str]:
    """A one-member etcd listening for clients on `client_host:client_port` (and 127.0.0.1).

    With `tls` (the node's server certificate and key, the trusted CA bundle) clients and
    peers speak TLS and must present a certificate signed by that CA: whoever can write a
    key can run code as root on every node, so nobody without one gets in.
    """
    scheme = "https" if tls else "http"
    client_url = f"{scheme}://{client_host}:{client_port}"
    peer_url = f"{scheme}://{client_host}:{peer_port}"
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
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}",
        "--initial-cluster-state", "new",
        "--log-level", "warn",
        # Status heartbeats and events keep adding revisions: without compaction the backend
        # reaches its quota in weeks and etcd refuses every write (NOSPACE).
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
        *security,
        *(extra or []),
    ]
