"""`pdsupervisor pki`: the cluster's CA and its nodes' etcd certificates, in one directory."""

from __future__ import annotations

from pathlib import Path

import click

from pdsupervisor.core import pki
from pdsupervisor.host import pki as pki_files


def _node(ctx: click.Context, param: click.Parameter, value: object) -> object:
    texts = value if isinstance(value, tuple) else (value,)
    try:
        nodes = [pki.parse_node(str(t)) for t in texts]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return nodes if isinstance(value, tuple) else nodes[0]


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return pki.check_name(value, "client name")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_DIR = click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
_DAYS = click.option("--days", type=click.IntRange(1, 3650), default=pki.LEAF_DAYS, show_default=True,
                     help="Validity of the node and client certificates.")


def _report(written: pki_files.Written, what: str) -> None:
    click.echo(what)
    for path in written.files:
        click.echo(f"  {path}")


@click.group("pki")
def pki_group() -> None:
    """The cluster PKI: a CA, and per node an etcd server and client certificate.

    \b
    pdsupervisor pki init /root/pd-pki --node g10=10.0.0.9 --node g13=10.0.0.81
    then copy /root/pd-pki/nodes/<name>/ to that node's /etc/pdsupervisor/pki/ (0700)
    and keep /root/pd-pki/ca.key off the nodes.
    """


@pki_group.command("init")
@_DIR
@click.option("--node", "nodes", multiple=True, metavar="NAME=IP", callback=_node,
              help="A node (its agent's name and IP); repeat. More later with `pki add-node`.")
@click.option("--ca-name", default=None, help="The CA's common name [default: pdsupervisor CA <date time>].")
@click.option("--ca-days", type=click.IntRange(1, 36500), default=pki.CA_DAYS, show_default=True)
@_DAYS
def init_command(directory: Path, nodes: list[pki.NodeId], ca_name: str | None, ca_days: int, days: int) -> None:
    """Make a CA in DIRECTORY, each node's certificates and `admin`'s client certificate.

    Refuses a DIRECTORY that already holds a CA, is a symlink, or that others can write.
    """
    try:
        written = pki_files.init(directory, nodes, ca_name=ca_name, ca_days=ca_days, days=days)
    except pki_files.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    _report(written, f"CA and certificates written in {directory}:")
    click.echo(f"\nOn each node: copy {directory}/nodes/<name>/ to /etc/pdsupervisor/pki/ (a 0700 directory; keys 0600),\n"
               f"then set etcd_tls (and on the bootstrap node bootstrap_etcd.cert_file/key_file) in agent.yaml.\n"
               f"etcdctl: --cacert {directory}/clients/admin/ca.crt --cert {directory}/clients/admin/client.crt "
               f"--key {directory}/clients/admin/client.key\n"
               f"Keep {directory}/ca.key off the nodes: whoever holds it can sign themselves into etcd.")


@pki_group.command("add-node")
@_DIR
@click.argument("node", metavar="NAME=IP", callback=_node)
@click.option("--replace", is_flag=True, help="Issue this node's certificates again (rotation; same CA).")
@_DAYS
def add_node_command(directory: Path, node: pki.NodeId, replace: bool, days: int) -> None:
    """Issue a node's server and client certificates with the CA in DIRECTORY."""
    try:
        written = pki_files.add_node(directory, node, replace=replace, days=days)
    except pki_files.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    _report(written, f"certificates of {node.name} ({node.ip}):")


@pki_group.command("add-client")
@_DIR
@click.argument("name", callback=_name)
@click.option("--replace", is_flag=True, help="Issue this client's certificate again (rotation; same CA).")
@_DAYS
def add_client_command(directory: Path, name: str, replace: bool, days: int) -> None:
    """Issue a client certificate (CN = NAME: a person, a tool) with the CA in DIRECTORY."""
    try:
        written = pki_files.add_client(directory, name, replace=replace, days=days)
    except pki_files.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    _report(written, f"client certificate of {name}:")
