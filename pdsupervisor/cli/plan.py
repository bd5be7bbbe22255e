"""`pdsupervisor plan`: show what would run where, with nothing started."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pdsupervisor.cli.cluster import console
from pdsupervisor.cli.specfile import invalid_spec, read_spec
from pdsupervisor.core.checks import hard_failures
from pdsupervisor.core.models import NodeFacts, RdmaDevice, RdmaPort
from pdsupervisor.core.planner import Plan, plan_cluster
from pdsupervisor.core.rollout import how_roles_change
from pdsupervisor.core.spec import ClusterSpec, SpecError


def parse_node(text: str) -> NodeFacts:
    """`NAME=IP[,key=value...]` -> NodeFacts.

    Keys: accelerators=N, rdma=DEV[:DEV...] (devices with a port up), state_dir=PATH,
    python=PATH, thp=MODE, hugepages=N, label.KEY=VALUE.
    """
    head, *pairs = text.split(",")
    name, sep, ip = head.partition("=")
    if not sep or not name or not ip:
        raise click.BadParameter(f"{text!r}: expected NAME=IP[,key=value...]", param_hint="--node")
    labels: dict[str, str] = {}
    fields: dict[str, object] = {"name": name, "ip": ip, "labels": labels}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} in {text!r}: expected key=value", param_hint="--node")
        if key.startswith("label."):
            labels[key[len("label."):]] = value
        elif key == "rdma":
            fields["rdma_devices"] = [
                RdmaDevice(name=d, ports=[RdmaPort(port=1, state="ACTIVE")]) for d in value.split(":") if d
            ]
        elif key in ("accelerators", "hugepages"):
            fields["accelerators" if key == "accelerators" else "hugepages_total"] = int(value)
        elif key == "thp":
            fields["thp_mode"] = value
        elif key in ("state_dir", "python"):
            fields[key] = value
        else:
            raise click.BadParameter(f"unknown key {key!r} in {text!r}", param_hint="--node")
    return NodeFacts.model_validate(fields)


def plan_table(plan: Plan, spec: ClusterSpec, out: Console) -> None:
    masters = plan.masters()  # none: Mooncake disabled; several: HA, the leader found through etcd
    ha = f" (HA: {', '.join(n for n, _ in masters)})" if len(masters) > 1 else ""
    master = f"master {plan.master_address}{ha}  " if masters else ""
    out.print(
        f"[bold]{plan.cluster}[/]  etcd {', '.join(plan.etcd_endpoints)}  {master}"
        f"{_dp(plan, spec)}  EP {plan.ep_size}  proxy {plan.proxy_url}"
    )
    table = Table(show_lines=False)
    for col in ("node", "ip", "process", "role", "endpoint", "dp", "argv"):
        table.add_column(col, overflow="fold")
    for node, np_ in plan.nodes.items():
        for p in np_.processes:
            rank = "" if p.dp_rank is None else f"{p.dp_rank}/{plan.dp_size}"
            table.add_row(node, np_.ip, p.name, p.role, p.endpoint or "", rank, " ".join(p.argv))
    out.print(table)
    for note in how_roles_change(plan, spec):
        out.print(f"on change: {note}")
    for node, np_ in plan.nodes.items():
        if np_.mooncake_config:
            out.print(f"{node}: {np_.mooncake_config_path} = {json.dumps(np_.mooncake_config)}")


def _dp(plan: Plan, spec: ClusterSpec) -> str:
    """The decode DP layout, and how the engines are told it (their profile)."""
    if spec.decode.dp_mode == "independent":
        return f"decode: independent engines (no DP group; engine profile {spec.engine})"
    how = {"vllm": "--data-parallel-* flags", "vllm-gaudi": "VLLM_DP_* env", "custom": "placeholders only"}[spec.engine]
    master = f", master {plan.dp_master}:{spec.decode.dp_master_port}" if plan.dp_master else ""
    return f"DP size {plan.dp_size}{master} ({spec.engine}: {how})"


@click.command("plan")
@click.option("-f", "--file", "spec_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Cluster spec (YAML or JSON).")
@click.option("--node", "nodes", multiple=True, metavar="NAME=IP[,key=value...]",
              help="A registered node and its facts (repeat).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def plan_command(spec_file: Path, nodes: tuple[str, ...], output: str) -> None:
    """Print the plan for SPEC on the given nodes; nothing is started."""
    spec = read_spec(spec_file)
    facts = {f.name: f for f in map(parse_node, nodes)}
    try:
        plan = plan_cluster(spec, facts)
    except SpecError as exc:  # cannot be placed on these nodes
        invalid_spec(spec_file, exc.problems)
    for node, check, why in hard_failures(spec, facts, plan):  # what the coordinator would refuse
        click.echo(f"warning: {node}: {check}: {why} (host_requirements.hard: the cluster would stay pending)",
                   err=True)
    if output == "json":
        click.echo(json.dumps(plan.model_dump(mode="json"), indent=2))
    else:
        plan_table(plan, spec, console())
