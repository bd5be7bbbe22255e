"""The command line of a one-member etcd (argv only: the binary is the caller's to find)."""

from __future__ import annotations


def etcd_argv(
    *,
    name: str,
    data_dir: str,
    client_host: str,
    client_port: int = 2379,
    peer_port: int = 2380,
    extra: list[str] | None = None,
    binary: str,
) -> list[str]:
    """A one-member etcd listening for clients on `client_host:client_port`."""
    client_url = f"http://{client_host}:{client_port}"
    peer_url = f"http://{client_host}:{peer_port}"
    # Also on loopback, so `127.0.0.1:<port>` (the agent's default endpoint, etcdctl) reaches it.
    listen = [client_url] + ([f"http://127.0.0.1:{client_port}"] if not client_host.startswith("127.") else [])
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
        *(extra or []),
    ]
