"""`pdsupervisor etcd members | replace-member`: etcd's own members, through any agent's API."""

from __future__ import annotations

from urllib.parse import urlsplit

import click
import yaml
from rich.markup import escape
from rich.table import Table

from pdsupervisor.cli.cluster import api_options, console, make_client, run
from pdsupervisor.core.etcd_members import MemberReplaced, ReplaceRequest


@click.group("etcd")
def etcd_group() -> None:
    """etcd's members: health, and replacing a dead one."""


@etcd_group.command("members")
@api_options
def members_command(api: str, token_file: str | None, ca_file: str | None) -> None:
    """Every etcd member: up or not, leader, database size, raft term and index."""
    doc = run(make_client(api, token_file, ca_file).etcd())
    out = console()
    table = Table(box=None, pad_edge=False)
    for col in ("Name", "ID", "Client URL", "Peer URL", "Up", "Leader", "DB", "Raft term", "Raft index", "Errors"):
        table.add_column(col)
    for m in doc.members:
        table.add_row(m.name or "(not started)", m.id, ",".join(m.client_urls), ",".join(m.peer_urls),
                      "[green]up[/]" if m.up else "[red]down[/]", "*" if m.is_leader else "",
                      "" if m.db_size is None else f"{m.db_size / 2**20:.1f} MiB",
                      "" if m.raft_term is None else str(m.raft_term), "" if m.raft_index is None else str(m.raft_index),
                      escape("; ".join(m.errors)))
    out.print(table)
    out.print(escape(doc.summary()))


def new_member_config(done: MemberReplaced) -> str:
    """What the new member's agent configuration must say (hosts from the peer URLs)."""
    members = {name: urlsplit(url).hostname or url for name, url in done.members.items()}
    return yaml.safe_dump({"bootstrap_etcd": {"members": members, "initial_cluster_state": "existing"}},
                          sort_keys=False)


@etcd_group.command("replace-member")
@api_options
@click.argument("name")
@click.option("--peer-url", required=True, help="The new member's peer URL, e.g. https://10.0.0.4:2380.")
@click.option("--new-name", help="The new member's (its node's) name; default: NAME.")
def replace_member_command(api: str, token_file: str | None, ca_file: str | None, name: str, peer_url: str,
                           new_name: str | None) -> None:
    """Replace the dead etcd member NAME by a new one at --peer-url.

    Refused (nothing changed) unless NAME is down and the members up keep a quorum without it
    and with the new member not yet started. Then prints what the new node's agent needs.
    """
    try:
        req = ReplaceRequest(name=name, peer_url=peer_url, new_name=new_name)
    except ValueError as exc:
        raise click.BadParameter(str(exc).splitlines()[-1]) from None
    done = run(make_client(api, token_file, ca_file).replace_etcd_member(req))
    click.echo(f"removed member {name} ({done.removed_id}); added {done.name} ({done.added_id}) at {done.peer_url}")
    click.echo(f"\nOn the new node {done.name}, with an EMPTY etcd data dir (bootstrap_etcd.data_dir, default "
               "<state_dir>/etcd), start pd-agent with this in its configuration (and the same "
               "member list on every other node):\n")
    click.echo(new_member_config(done))
