"""What an address means for who can reach it (pure: no name resolution)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) or `localhost`: only this machine can connect.

    A host name other than `localhost` is not loopback: it may resolve to anything.
    """
    bare = host.strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
