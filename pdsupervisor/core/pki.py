"""The cluster PKI's names and layout (pure): which files there are, and which names go into
which certificate. `pdsupervisor.host.pki` makes the keys and writes the files.

One directory holds the cluster CA and, per node and per client, a directory that is
everything that node (or person) needs, so installing a node is copying one directory:

    <dir>/ca.crt  <dir>/ca.key                     the CA (ca.key never leaves this machine)
    <dir>/nodes/<name>/ca.crt                      a copy of the CA certificate (the trust bundle)
    <dir>/nodes/<name>/server.crt, server.key      the node's etcd server (and peer) certificate
    <dir>/nodes/<name>/client.crt, client.key      the node's etcd client certificate (CN = name)
    <dir>/clients/<name>/ca.crt, client.crt, client.key   a client that is not a node (`admin`)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import PurePath

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # also a safe path component
ADMIN = "admin"  # the client certificate `pki init` makes for the CLI and etcdctl
CA_DAYS = 3650
LEAF_DAYS = 730
LOOPBACK_DNS = "localhost"
LOOPBACK_IP = "127.0.0.1"

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"


@dataclass(frozen=True)
class NodeId:
    """A node of the PKI: its name (as the agent's `name`) and the IP etcd listens on."""

    name: str
    ip: str


@dataclass(frozen=True)
class LeafProfile:
    """What one leaf certificate says: its common name, SANs and what it may be used for."""

    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    server: bool  # serverAuth (and clientAuth: etcd peers are both)
    client: bool  # clientAuth


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '.', '-' (1-63, starting with a letter or digit)")
    return name


def parse_node(text: str) -> NodeId:
    """`NAME=IP` -> NodeId; ValueError saying what is wrong."""
    name, sep, ip = text.partition("=")
    if not sep or not name or not ip:
        raise ValueError(f"{text!r}: expected NAME=IP")
    try:
        address = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        raise ValueError(f"{text!r}: {ip!r} is not an IP address") from None
    return NodeId(check_name(name, "node name"), str(address))


def server_profile(node: NodeId) -> LeafProfile:
    """The node's etcd server certificate: reached as its name, its IP and on loopback (the
    embedded etcd listens on the node IP and 127.0.0.1). Also a client certificate, as etcd
    peers present their server certificate to each other."""
    dns = _unique([node.name, LOOPBACK_DNS])
    ips = _unique([node.ip, LOOPBACK_IP])
    return LeafProfile(common_name=node.name, dns_names=dns, ip_addresses=ips, server=True, client=True)


def client_profile(name: str) -> LeafProfile:
    """A client certificate: CN = the node (or user) name, which etcd takes as the user name
    when its RBAC is on."""
    return LeafProfile(common_name=check_name(name, "client name"), dns_names=(), ip_addresses=(),
                       server=False, client=True)


def node_dir(name: str) -> PurePath:
    return PurePath("nodes") / check_name(name, "node name")


def client_dir(name: str) -> PurePath:
    return PurePath("clients") / check_name(name, "client name")


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
