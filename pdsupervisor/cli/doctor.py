"""`pdsupervisor doctor`: host preflight on this node, or on every member with `--cluster`.

The I/O half of `pdsupervisor.core.checks`: gathers facts with `pdsupervisor.host.probes` under `--root`, tries
the plan's ports, asks etcd for `/version` through the store (over TLS with `--etcd-ca`, showing
`--etcd-cert`), writes the `--fix` files, and prints.

On a live node the agent (`--api`) answers: doctor then plans on the registered members (`GET /nodes`)
and takes a port held by this node's supervised processes (`GET /status`, or `GET /cluster` rows for
this node; their children included) as the cluster's own, not as a clash. This node's name, etcd and
etcd TLS files come from the agent's config (`--agent-config`) unless flags give them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import click
import psutil
import yaml
from rich.table import Table

from pdsupervisor.api.client import ApiClient, ApiError
from pdsupervisor.cli.cluster import api_options, console, make_client, run
from pdsupervisor.cli.plan import parse_node
from pdsupervisor.cli.specfile import read_spec
from pdsupervisor.core.checks import (
    CheckResult,
    EtcdProbe,
    check_etcd,
    check_model,
    check_ports,
    fact_checks,
    held_by_cluster,
    model_is_path,
    planned_fixes,
    planned_roles,
    ports_needed,
    worst,
)
from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.planner import Plan, plan_cluster
from pdsupervisor.core.spec import ClusterSpec, SpecError
from pdsupervisor.host import probes
from pdsupervisor.store.etcd import Store, StoreUnavailable, TlsRefused
from pdsupervisor.store.transport import CredentialsError, client_ssl_context

STATUS_STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "red"}
AGENT_CONFIG_PATH = "/etc/pdsupervisor/agent.yaml"  # pd-agent's default config (agent.config.DEFAULT_CONFIG_PATH)
AGENT_TIMEOUT_S = 2.0  # doctor asks the agent, but does not wait on it


@dataclass(frozen=True)
class LiveView:
    """What the agent at `--api` says about the cluster: `note` says whether it answered."""

    note: str
    reached: bool
    members: dict[str, NodeFacts]
    pids: dict[int, str]  # pid -> this node's supervised process it belongs to (children included)


@dataclass(frozen=True)
class FixDone:
    check: str
    path: str  # the path written (under --root)
    before: str
    after: str
    error: str | None = None


def _rooted(root: str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def _nr_hugepages(root: str) -> int | None:
    """The kernel's setting, read back after a write (meminfo's total can lag in a fake tree)."""
    try:
        return int(_rooted(root, "/proc/sys/vm/nr_hugepages").read_text().strip())
    except (OSError, ValueError):
        return None


def local_facts(root: str, name: str, ip: str, accelerators: int | None) -> NodeFacts:
    """This node's facts as the agent reads them (`probes.node_facts`), except the hugepages
    total: the kernel's setting, so a `--fix` that just wrote it is judged by what it wrote."""
    facts = probes.node_facts(root, name=name, ip=ip, slots=accelerators)
    nr = _nr_hugepages(root)
    return facts if nr is None else facts.model_copy(update={"hugepages_total": nr})


def port_check(needed: dict[int, str], cluster_pids: dict[int, str] | None = None) -> CheckResult:
    """Whether every port in `needed` (port -> who needs it) can be bound here now, or is held by
    one of this node's supervised processes (`cluster_pids`: pid -> process name)."""
    taken = taken_ports(sorted(needed))
    ours = held_by_cluster(port_holders(sorted(taken)), cluster_pids) if taken and cluster_pids else {}
    return check_ports(needed, taken, ours)


def port_holders(ports: list[int]) -> dict[int, set[int]]:
    """Port -> the pids listening on it (only those psutil may see: all of them as root)."""
    holders: dict[int, set[int]] = {p: set() for p in ports}
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in holders and conn.pid:
                holders[conn.laddr.port].add(conn.pid)
    except (psutil.Error, OSError):
        pass
    return holders


def with_children(pids: dict[int, str]) -> dict[int, str]:
    """`pids` and every descendant of each (an engine's workers), named as their ancestor."""
    out = dict(pids)
    for pid, name in pids.items():
        try:
            out.update({c.pid: name for c in psutil.Process(pid).children(recursive=True)})
        except psutil.Error:
            pass
    return out


async def live_view(client: ApiClient, name: str) -> LiveView:
    """The registered members and this node's supervised pids, from the agent; not `reached` (and
    nothing known) when no agent answers, or something else does."""
    try:
        members = {n.name: n for n in (await client.nodes()).nodes}
        status = await client.status()
        rows: list[tuple[str, int | None]] = []
        if isinstance(status, dict) and (status.get("node") or {}).get("name") == name:
            rows = [(p.get("name", "?"), p.get("pid")) for p in [*status.get("processes", []),
                                                                   *status.get("bootstrap", [])]]
        else:  # an agent on another node: this node's rows of /cluster (no bootstrap etcd there)
            rows = [(r.name, r.pid) for r in (await client.cluster()).processes if r.node == name]
    except (TimeoutError, ApiError, aiohttp.ClientError, OSError, AttributeError, TypeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return LiveView(f"no agent at {client.base_url} ({why}): planned on this host and --node", False, {}, {})
    pids = with_children({pid: pname for pname, pid in rows if isinstance(pid, int)})
    note = (f"agent at {client.base_url}: planned on the {len(members)} registered member(s); "
            f"{name} {'is' if name in members else 'is NOT'} registered")
    return LiveView(note, True, members, pids)


def agent_config(path: str | None) -> dict[str, Any]:
    """`name`, `etcd` and `etcd_tls` of pd-agent's config at `path` (default: AGENT_CONFIG_PATH, when
    present); {} when there is none. Read as YAML, not through the agent's model: doctor needs three keys."""
    explicit = path is not None
    path = path or AGENT_CONFIG_PATH
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        if explicit:
            raise click.UsageError(f"--agent-config {path}: no such file") from None
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(doc, dict):
        return {}
    out: dict[str, Any] = {"path": path}
    if isinstance(doc.get("name"), str):
        out["name"] = doc["name"]
    etcd = doc.get("etcd")
    if isinstance(etcd, str):
        etcd = [etcd]
    if isinstance(etcd, list) and etcd and all(isinstance(e, str) for e in etcd):
        out["etcd"] = etcd
    tls = doc.get("etcd_tls")
    if isinstance(tls, dict):
        out["etcd_tls"] = {k: tls.get(k) for k in ("ca_file", "cert_file", "key_file")}
    return out


def taken_ports(ports: list[int]) -> dict[int, str]:
    """Ports a server could not bind now (any address), with the holder when psutil may tell."""
    taken: dict[int, str] = {}
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "taken"
            try:
                s.bind(("", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    taken[port] = ""
    if taken:
        try:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port in taken and conn.pid and not taken[conn.laddr.port]:
                    taken[conn.laddr.port] = f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
        except (psutil.Error, OSError):
            pass  # not root: the holder stays unnamed
    return taken


def probe_etcd(endpoint: str, tls: ssl.SSLContext | None = None, timeout_s: float = 2.0) -> EtcdProbe:
    """`Store.version()` (https with `tls`, unless `endpoint` names its scheme); clock offset =
    local time minus the answer's Date header (centred on its second)."""
    return asyncio.run(_probe_etcd(endpoint, tls, timeout_s))


async def _probe_etcd(endpoint: str, tls_context: ssl.SSLContext | None, timeout_s: float) -> EtcdProbe:
    store = Store([endpoint], "doctor", tls=tls_context, timeout_s=timeout_s)
    url, tls = store.endpoints[0], store.endpoints[0].startswith("https://")
    async with store:
        before = time.time()
        try:
            answer = await store.version()
        except TlsRefused as exc:
            return EtcdProbe(url, error=str(exc), refused=True, tls=tls)
        except StoreUnavailable as exc:  # refused, unreachable, timed out, not etcd's /version
            return EtcdProbe(url, error=str(exc), tls=tls)
        local = (before + time.time()) / 2
    offset = None if answer.date is None else local - (answer.date + 0.5)
    return EtcdProbe(url, version=answer.server, offset_s=offset, tls=tls)


def etcd_tls(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """The SSL context doctor reaches etcd with: `ca_file` checks etcd's certificate, and
    `cert_file`/`key_file` are shown to it; None without `ca_file` (plaintext)."""
    if bool(cert_file) != bool(key_file):
        raise click.UsageError("--etcd-cert and --etcd-key go together")
    if cert_file and not ca_file:
        raise click.UsageError("--etcd-cert needs --etcd-ca (the CA etcd's certificate is checked against)")
    if not ca_file:
        return None
    try:
        return client_ssl_context(ca_file, cert_file, key_file)
    except CredentialsError as exc:
        raise click.UsageError(str(exc)) from None


def apply_fixes(spec: ClusterSpec, facts: NodeFacts, root: str) -> list[FixDone]:
    """Write THP and nr_hugepages under `root` (only those two: safe, and what the guide does by hand)."""
    done: list[FixDone] = []
    for check, path, value in planned_fixes(spec, facts):
        target = _rooted(root, path)
        before = facts.thp_mode if check == "thp" else facts.hugepages_total
        try:
            target.write_text(value + "\n")
        except OSError as exc:
            done.append(FixDone(check, str(target), str(before), value, exc.strerror or str(exc)))
        else:
            done.append(FixDone(check, str(target), str(before), value))
    return done


def _plan(spec: ClusterSpec, nodes: dict[str, NodeFacts]) -> tuple[Plan | None, str]:
    try:
        return plan_cluster(spec, nodes), ""
    except SpecError as exc:
        return None, "; ".join(f"{p}: {w}" for p, w in exc.problems)


def _etcd_endpoint(spec: ClusterSpec, plan: Plan | None, local: NodeFacts, given: str | None) -> str | None:
    if given:
        return given
    if plan is not None:
        return plan.etcd_endpoints[0]
    if spec.etcd.endpoints:
        return spec.etcd.endpoints[0]
    if spec.etcd.bootstrap_node == local.name:
        return f"{local.ip}:{spec.etcd.client_port}"
    return None


def results_table(rows: list[tuple[str, CheckResult]], with_node: bool) -> Table:
    table = Table(show_lines=False)
    for col in (["node"] if with_node else []) + ["check", "status", "found", "needed", "fix"]:
        table.add_column(col, overflow="fold")
    for node, r in rows:
        cells = [r.check, f"[{STATUS_STYLE[r.status]}]{r.status}[/]", r.found, r.needed, r.fix]
        table.add_row(*([node] if with_node else []), *cells)
    return table


def report_json(report: dict[str, Any]) -> str:
    """What `-o json` prints: the report with its CheckResult/FixDone objects as dicts."""
    return json.dumps(report, indent=2, default=asdict)


def run_local(spec: ClusterSpec, root: str, name: str, ip: str, accelerators: int | None,
              nodes: tuple[str, ...], etcd: str | None, fix: bool, tls: ssl.SSLContext | None = None,
              live: LiveView | None = None) -> dict[str, Any]:
    """Every check for this node; with `fix`, write the safe fixes first and check again. With
    `live` (the agent answered), planned on the registered members, and ports held by this node's
    supervised processes are the cluster's own.

    The report holds the CheckResult and FixDone objects (`report_json` for JSON)."""
    local = local_facts(root, name, ip, accelerators)
    fixes: list[FixDone] = []
    if fix:
        if root == "/" and os.geteuid() != 0:
            raise click.ClickException("--fix writes /sys and /proc: run it as root (or give --root DIR)")
        fixes = apply_fixes(spec, local, root)
        local = local_facts(root, name, ip, accelerators)
    others = {**(live.members if live else {}), **{f.name: f for f in map(parse_node, nodes)}}
    if name in others:  # the operator's view of this node's address and labels, our own probes
        local = local.model_copy(update={"ip": others[name].ip, "labels": others[name].labels})
    plan, plan_note = _plan(spec, {**others, name: local})
    roles = planned_roles(plan, name)
    results = fact_checks(spec, local, roles)
    results.append(port_check(ports_needed(spec, plan, name), live.pids if live else None))
    results.append(check_model(spec, Path(spec.model).expanduser().exists() if model_is_path(spec.model) else None))
    endpoint = _etcd_endpoint(spec, plan, local, etcd)
    results += check_etcd(probe_etcd(endpoint, tls) if endpoint else None)
    return {
        "node": name, "roles": roles, "agent": live.note if live else None,
        "plan": "planned" if plan is not None else f"not planned ({plan_note}): ports are every role's",
        "fixes": fixes, "status": worst(results), "results": results,
    }


async def _cluster_checks(client: ApiClient, spec: ClusterSpec) -> dict[str, Any]:
    """Every member's checks from its registered facts (CheckResult objects)."""
    members = {n.name: n for n in (await client.nodes()).nodes}
    plan, plan_note = _plan(spec, members)
    nodes: dict[str, Any] = {}
    every: list[CheckResult] = []
    for name, facts in sorted(members.items()):
        roles = planned_roles(plan, name)
        results = fact_checks(spec, facts, roles)
        every += results
        nodes[name] = {"roles": roles, "status": worst(results), "results": results}
    return {"plan": "planned" if plan is not None else f"not planned ({plan_note})",
            "status": worst(every), "nodes": nodes}


@click.command("doctor")
@click.option("-f", "--file", "spec_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Cluster spec to check against.")
@click.option("--cluster", "cluster_wide", is_flag=True,
              help="Every member's registered facts (GET /nodes) instead of this host.")
@api_options
@click.option("--root", default="/", show_default=True, help="Root for /sys, /proc and /dev (a test tree).")
@click.option("--name", default=None, help="This node's name [default: the hostname, as pd-agent's].")
@click.option("--ip", default=None, help="This node's IP [default: first non-loopback IPv4].")
@click.option("--accelerators", type=int, default=None, help="Override the accelerator count probed.")
@click.option("--node", "nodes", multiple=True, metavar="NAME=IP[,key=value...]",
              help="Another node's facts for planning (repeat), as `pdsupervisor plan --node`.")
@click.option("--etcd", default=None, metavar="HOST:PORT", help="etcd to check [default: from the plan].")
@click.option("--etcd-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA bundle etcd's certificate is checked against (etcd is then reached over https).")
@click.option("--etcd-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Client certificate shown to etcd, with --etcd-key (the node's etcd_tls files).")
@click.option("--etcd-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--agent-config", "agent_config_file", type=click.Path(dir_okay=False), default=None,
              help=f"pd-agent's config: this node's name, etcd and etcd_tls unless flags give them "
                   f"[default: {AGENT_CONFIG_PATH}, when present].")
@click.option("--fix", is_flag=True, help="Write THP and nr_hugepages under --root (as root) and say what changed.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor_command(spec_file: Path, cluster_wide: bool, api: str, token_file: str | None, ca_file: str | None,
                   root: str, name: str | None, ip: str | None, accelerators: int | None, nodes: tuple[str, ...],
                   etcd: str | None, etcd_ca: str | None, etcd_cert: str | None, etcd_key: str | None,
                   agent_config_file: str | None, fix: bool, output: str) -> None:
    """Check this host (or every member) against SPEC: found, needed, and the command to fix it.

    Exit 1 when a check FAILs (a requirement in host_requirements.hard, a taken port, a missing model),
    2 when the spec is invalid.
    """
    spec = read_spec(spec_file)  # invalid: exit 2, as `plan` and `start`
    conf = {} if cluster_wide else agent_config(agent_config_file)
    if etcd_ca or etcd_cert or etcd_key or not conf.get("etcd_tls"):
        tls = etcd_tls(etcd_ca, etcd_cert, etcd_key)
    else:  # the agent's own etcd client files (readable by root, as a rule)
        files = conf["etcd_tls"]
        try:
            tls = etcd_tls(files["ca_file"], files["cert_file"], files["key_file"])
        except click.UsageError as exc:
            raise click.UsageError(f"{conf['path']}: etcd_tls: {exc.message} (run as root, or give --etcd-ca, "
                                   "--etcd-cert and --etcd-key)") from None
    if cluster_wide:
        if fix:
            raise click.ClickException("--fix applies to this host only: run `pdsupervisor doctor --fix` on each node")
        doc = run(_cluster_checks(make_client(api, token_file, ca_file), spec))
        rows = [(n, r) for n, d in doc["nodes"].items() for r in d["results"]]
    else:
        name = name or conf.get("name") or socket.gethostname()  # pd-agent's own name: the plan must agree
        etcd = etcd or (conf["etcd"][0] if conf.get("etcd") else None)
        client = dataclasses.replace(make_client(api, token_file, ca_file), timeout_s=AGENT_TIMEOUT_S)
        live = asyncio.run(live_view(client, name))
        doc = run_local(spec, root, name, ip or probes.default_ip(), accelerators, nodes, etcd, fix, tls,
                        live if live.reached else None)
        doc["agent"] = live.note
        rows = [(name, r) for r in doc["results"]]
    if output == "json":
        click.echo(report_json(doc))
    else:
        out = console()
        fixes: list[FixDone] = doc.get("fixes", [])
        for f in fixes:
            if f.error:
                out.print(f"[red]could not fix[/] {f.check}: {f.path}: {f.error}")
            else:
                out.print(f"[green]fixed[/] {f.check}: wrote {f.after} to {f.path} (was {f.before})")
        if doc.get("agent"):
            out.print(f"[dim]{doc['agent']}[/]")
        out.print(f"plan: {doc['plan']}")
        out.print(results_table(rows, with_node=cluster_wide))
        out.print(f"overall: [{STATUS_STYLE[doc['status']]}]{doc['status']}[/]")
    if doc["status"] == "FAIL":
        sys.exit(1)
