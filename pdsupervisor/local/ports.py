"""Free ports for local clusters, benches and tests: never one another process may take first."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports free_port never hands out: Mooncake's transfer engine binds random ports in its RPC
# range (MC_MIN_PRC_PORT..MC_MAX_PRC_PORT defaults; seen: two per engine) while it starts, and
# the benchmarks' fixed ports (bench/_localbench.py) lie in 12000-12999.
MOONCAKE_RPC_PORTS = frozenset(range(15000, 17001))
BENCH_PORTS = frozenset(range(12000, 13000))
RESERVED_PORTS = MOONCAKE_RPC_PORTS | BENCH_PORTS


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", span: int = 1) -> int:
    """The first of `span` consecutive ports nobody listens on now on `host` (tests, benchmarks).

    Not the kernel's `bind(0)`: that draws from the ephemeral range, where the agents' own
    outgoing connections take ports too, and may hand the same port out twice before anyone
    listens on it (a proxy and an agent API once got one port). These ports lie outside
    that range and outside RESERVED_PORTS (Mooncake's engines bind random ports there while
    they start, possibly before a port handed out here is listened on; the benchmarks' fixed
    ports), and are never handed out twice by one process.
    """
    low, high = _ephemeral_range()
    lo, hi = (10000, low) if low - 10000 >= 5000 else (high + 1, 65536)
    rng = random.Random()
    for _ in range(2000 if hi - span > lo else 0):
        first = rng.randrange(lo, hi - span)
        ports = range(first, first + span)
        if not _handed_out.isdisjoint(ports) or not RESERVED_PORTS.isdisjoint(ports):
            continue
        if all(_can_bind(host, p) for p in ports):
            _handed_out.update(ports)
            return first
    raise RuntimeError(f"no {span} free consecutive port(s) on {host} in {lo}-{hi - 1}")
