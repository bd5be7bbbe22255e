"""`pdsupervisor nodes`: the registered members, what they are and what they run.

From `GET /nodes` (each member's facts as its agent registered them, and the coordinator)
and `GET /cluster` (the roles assigned or planned on each node, and the spare ones).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.table import Table

from pdsupervisor.cli.cluster import api_options, console, make_client, run
from pdsupervisor.core.documents import ClusterDocument, NodesDocument

ROLE_ORDER = ("etcd", "mooncake-master", "prefill", "decode", "proxy")


def node_roles(doc: ClusterDocument) -> dict[str, list[str]]:
    """Node -> its roles in `GET /cluster` (assigned, or planned and waiting), then `spare`."""
    roles: dict[str, set[str]] = {}
    for p in doc.processes:
        roles.setdefault(p.node, set()).add(p.role)
    out = {node: sorted(rs, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER))
           for node, rs in roles.items()}
    for node in doc.placement.get("spare", []):
        out.setdefault(node, []).append("spare")
    return out


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def nodes_report(nodes: NodesDocument, cluster: ClusterDocument, now: float) -> dict[str, Any]:
    """What `-o json` prints: each member's registered facts, plus `roles` and `lease_age_s`
    (seconds since it registered under its current lease; None when it did not say)."""
    roles = node_roles(cluster)
    return {
        "leader": nodes.leader,
        "nodes": [{
            **n.model_dump(mode="json"),
            "roles": roles.get(n.name, []),
            "lease_age_s": round(now - n.registered_at, 1) if n.registered_at else None,
        } for n in nodes.nodes],
    }


def nodes_table(report: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("Node", "IP", "Accelerators", "Agent", "API", "Lease age", "Roles"):
        table.add_column(col)
    for n in report["nodes"]:
        name = f"{n['name']} [dim](coordinator)[/]" if n["name"] == report["leader"] else n["name"]
        table.add_row(
            name, n["ip"], str(n["accelerators"]), n["agent_version"] or "-", n["api_url"] or "-",
            age(n["lease_age_s"]) if n["lease_age_s"] is not None else "-", ", ".join(n["roles"]) or "-",
        )
    return table


@click.command("nodes")
@api_options
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def nodes_command(api: str, token_file: str | None, ca_file: str | None, output: str) -> None:
    """Registered nodes: IP, accelerators, agent version, API URL, lease age, roles."""
    client = make_client(api, token_file, ca_file)

    async def go() -> tuple[NodesDocument, ClusterDocument]:
        return await client.nodes(), await client.cluster()

    nodes, cluster = run(go())
    report = nodes_report(nodes, cluster, time.time())
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    out = console()
    if not report["nodes"]:
        out.print("no registered nodes")
        return
    out.print(nodes_table(report))
