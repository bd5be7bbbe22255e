"""Node facts probes: pure functions reading files under a configurable root.

Tests feed a fake `/sys`, `/proc` and `/dev` tree by passing its directory as `root`.
Nothing here raises on a missing file: an absent feature is simply not reported.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import psutil

from pdsupervisor.core.models import NodeFacts, RdmaDevice, RdmaPort


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def rdma_devices(root: str | Path = "/") -> list[RdmaDevice]:
    """`<root>/sys/class/infiniband/<dev>/ports/<n>/state` (e.g. `4: ACTIVE`) and net devices."""
    base = Path(root) / "sys/class/infiniband"
    devices: list[RdmaDevice] = []
    if not base.is_dir():
        return devices
    for dev in sorted(base.iterdir()):
        netdir = dev / "device/net"
        netdevs = sorted(p.name for p in netdir.iterdir()) if netdir.is_dir() else []
        ports: list[RdmaPort] = []
        portdir = dev / "ports"
        if portdir.is_dir():
            for p in sorted(portdir.iterdir(), key=lambda x: (len(x.name), x.name)):
                if not p.name.isdigit():
                    continue
                raw = (_read(p / "state") or "").strip()
                state = raw.split(":", 1)[-1].strip() if raw else "UNKNOWN"
                ports.append(RdmaPort(port=int(p.name), state=state or "UNKNOWN", netdevs=netdevs))
        devices.append(RdmaDevice(name=dev.name, ports=ports))
    return devices


def hugepages(root: str | Path = "/") -> tuple[int | None, int | None]:
    """(HugePages_Total, HugePages_Free) from `<root>/proc/meminfo`; None when absent."""
    text = _read(Path(root) / "proc/meminfo") or ""
    found: dict[str, int] = {}
    for key in ("HugePages_Total", "HugePages_Free"):
        m = re.search(rf"^{key}:\s*(\d+)", text, re.MULTILINE)
        if m:
            found[key] = int(m.group(1))
    return found.get("HugePages_Total"), found.get("HugePages_Free")


def thp_mode(root: str | Path = "/") -> str | None:
    """The bracketed word of `<root>/sys/kernel/mm/transparent_hugepage/enabled`."""
    text = _read(Path(root) / "sys/kernel/mm/transparent_hugepage/enabled") or ""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def accelerators(root: str | Path = "/") -> int:
    """Accelerator devices: `/dev/accel/accel*`, else `/dev/davinci<N>`, else `/dev/nvidia<N>`."""
    dev = Path(root) / "dev"
    for pattern in ("accel/accel*", "davinci[0-9]*", "nvidia[0-9]*"):
        found = [p for p in dev.glob(pattern) if re.search(r"\d+$", p.name)]
        if found:
            return len(found)
    return 0


def ipv4_addresses() -> list[str]:
    """Every IPv4 address of the host, non-loopback first."""
    addrs: list[str] = []
    for entries in psutil.net_if_addrs().values():
        addrs += [a.address for a in entries if a.family == socket.AF_INET]
    return sorted(set(addrs), key=lambda a: (a.startswith("127."), a))


def default_ip() -> str:
    addrs = ipv4_addresses()
    return addrs[0] if addrs else "127.0.0.1"


def cpu_count() -> int:
    return psutil.cpu_count() or 0


def memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def node_facts(root: str | Path, *, name: str, ip: str, slots: int | None = None, **extra: Any) -> NodeFacts:
    """The host facts a placement depends on, read under `root`, plus the caller's own `extra`
    fields (validated like the rest); `slots` overrides the probed accelerator count."""
    total, free = hugepages(root)
    return NodeFacts(
        name=name, ip=ip, hostname=socket.gethostname(),
        accelerators=slots if slots is not None else accelerators(root),
        rdma_devices=rdma_devices(root), hugepages_total=total, hugepages_free=free, thp_mode=thp_mode(root),
        **extra,
    )
