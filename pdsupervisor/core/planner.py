"""The planner: a pure function from (spec, registered nodes) to what runs where.

Everything the seed's scripts compute by hand lives here: placement, DP ranks and sizes,
ports, environment, argv rendered from the spec's templates, each node's Mooncake JSON
(built in pdsupervisor/core/mooncake.py) and the proxy's argv. No I/O, deterministic: the
same input gives the same plan.

The etcd process appears in the plan for people to see, but agents start it from their own
config (`role == "etcd"` is never assigned): etcd must exist before any assignment can be read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field

from pdsupervisor.core.etcd_access import proxy_etcd_args, proxy_etcd_env
from pdsupervisor.core.etcd_command import etcd_argv
from pdsupervisor.core.models import DrainSpec, FileSpec, NodeFacts, Probe, ProcessSpec, Strict
from pdsupervisor.core.mooncake import (
    METADATA_PORT_FIELD,
    choose_master_nodes,
    engine_env,
    ha_etcd_problems,
    is_ha,
    master_process,
    master_server_address,
    metadata_port,
    metadata_problems,
    mooncake_config,
)
from pdsupervisor.core.spec import ClusterSpec, RoleSpec, SpecError, render

ENGINE_ROLES = ("prefill", "decode")
# The `vllm` profile's DP group flags (upstream vLLM, one API server per rank), appended to
# the decode argv of a DP group unless its template already has DP_FLAG.
DP_FLAG = "--data-parallel-size"
VLLM_DP_ARGS = (DP_FLAG, "{dp_size}", "--data-parallel-rank", "{dp_rank}",
                "--data-parallel-address", "{dp_master_ip}", "--data-parallel-rpc-port", "{dp_master_port}")
# A stopping proxy stops taking requests and lets those in flight finish for up to 60 s
# (`pdsupervisor.aio.serve.SHUTDOWN_TIMEOUT_S`): its drain. SIGKILL only after that.
PROXY_STOP_TIMEOUT_S = 65.0


class PlanError(SpecError):
    """The spec is valid but cannot be placed on these nodes (e.g. a role is short of nodes)."""


class NodePlan(Strict):
    node: str
    ip: str
    roles: list[str] = Field(default_factory=list)
    processes: list[ProcessSpec] = Field(default_factory=list)
    mooncake_config: dict[str, object] | None = None
    mooncake_config_path: str | None = None


class Plan(Strict):
    cluster: str
    generation: int = 0
    placement: dict[str, list[str]]  # role -> nodes; decode in DP-index order
    etcd_endpoints: list[str]
    master_node: str
    master_address: str  # what engines are given: the master's host:port, or etcd://... (HA)
    proxy_node: str
    proxy_url: str
    dp_size: int
    ep_size: int
    dp_master: str | None
    nodes: dict[str, NodePlan]
    master_nodes: list[str] = Field(default_factory=list)  # every master's node (HA: several)

    # The lists below are asked for many times a cycle, of a plan the memo keeps for many
    # cycles (`plan_memo`): made once per plan, kept in its `__dict__` beside the fields (a
    # plan is final once made). Shared: callers must not change them.
    def engines(self) -> list[tuple[str, ProcessSpec]]:
        """Every prefill and decode engine as (node, process)."""
        return self._kept("_engines", lambda p: p.role in ENGINE_ROLES)

    def assignable(self) -> list[tuple[str, ProcessSpec]]:
        """What the coordinator assigns: every planned process but etcd (its agent starts it)."""
        return self._kept("_assignable", lambda p: p.role != "etcd")

    def masters(self) -> list[tuple[str, ProcessSpec]]:
        """Each Mooncake master as (node, process); empty when Mooncake is disabled."""
        return self._kept("_masters", lambda p: p.role == "mooncake-master")

    def _kept(self, name: str, which: Callable[[ProcessSpec], bool]) -> list[tuple[str, ProcessSpec]]:
        kept: list[tuple[str, ProcessSpec]] | None = self.__dict__.get(name)
        if kept is None:
            kept = self.__dict__[name] = [(n, p) for n, np in self.nodes.items() for p in np.processes if which(p)]
        return kept


def _eligible(facts: NodeFacts, role: RoleSpec) -> bool:
    return all(facts.labels.get(k) == v for k, v in role.labels.items())


def place(
    spec: ClusterSpec,
    nodes: Mapping[str, NodeFacts],
    previous: Mapping[str, Sequence[str]] | None = None,
    unmanaged: Collection[str] = (),
    recently_lost: Collection[str] = (),
) -> dict[str, list[str]]:
    """Choose nodes per role, keeping `previous` placement slot by slot (so DP indices stay).

    A slot whose node is gone is refilled from spare nodes only under `replace`, and never
    while the node is `unmanaged` (its agent away, its engines still answering) or
    `recently_lost` (within `policy.node_loss_grace_s`).
    Raises PlanError naming the role that is short.
    """
    previous = previous or {}
    roles: dict[str, RoleSpec] = {"prefill": spec.prefill, "decode": spec.decode}
    spares = spec.policy.spare_nodes
    reserved = {n for r in roles.values() for n in r.node_names} | set(spares)
    reserved |= {n for r in ENGINE_ROLES for n in previous.get(r, [])}
    used: set[str] = set()
    placement: dict[str, list[str]] = {}
    problems: list[tuple[str, str]] = []

    def take_free(role: RoleSpec, pool: Sequence[str]) -> str | None:
        for name in pool:
            if name in nodes and name not in used and _eligible(nodes[name], role):
                used.add(name)
                return name
        return None

    for role_name, role in roles.items():
        want = role.nodes or len(role.node_names)
        prev = list(previous.get(role_name, []))
        chosen: list[str] = []
        for i in range(want):
            preferred = prev[i] if i < len(prev) else (role.node_names[i] if role.node_names else None)
            if preferred is not None and preferred in nodes and preferred not in used:
                used.add(preferred)
                chosen.append(preferred)
                continue
            if preferred is None:  # fresh count-based slot: any unreserved eligible member
                pick = take_free(role, [n for n in sorted(nodes) if n not in reserved])
                if pick is None:
                    eligible = [n for n in nodes if _eligible(nodes[n], role)]
                    problems.append((
                        f"{role_name}.nodes",
                        f"needs {want} nodes{_label_note(role)}, {len(eligible)} eligible registered "
                        f"and not taken by another role",
                    ))
                    break
                chosen.append(pick)
                continue
            # the slot's node is not registered (never joined, or lost)
            if preferred in unmanaged:
                problems.append((f"{role_name}.node_names", f"node {preferred} is unmanaged: its agent is away, "
                                 "its engines still answer"))
            elif prev and spec.policy.node_loss == "replace" and preferred in recently_lost:
                problems.append((f"{role_name}.node_names", f"node {preferred} is not registered: none of its "
                                 "engines answers; replaced after policy.node_loss_grace_s"))
            elif prev and spec.policy.node_loss == "replace":
                pool = list(spares) or [n for n in sorted(nodes) if n not in reserved]
                pick = take_free(role, pool)
                if pick is not None:
                    chosen.append(pick)
                    continue
                problems.append((f"{role_name}.nodes", f"node {preferred} lost and no spare node left"))
            else:
                problems.append((f"{role_name}.node_names", f"node {preferred} is not registered"))
        placement[role_name] = chosen
    if problems:
        raise PlanError(problems)
    placement["spare"] = [n for n in sorted(nodes) if n not in used]
    return placement


def _label_note(role: RoleSpec) -> str:
    return f" with labels {role.labels}" if role.labels else ""


def _etcd_process(spec: ClusterSpec, facts: NodeFacts, *, generation: int) -> ProcessSpec:
    argv = etcd_argv(
        name=facts.name, data_dir=f"{facts.state_dir}/etcd", client_host=facts.ip,
        client_port=spec.etcd.client_port, peer_port=spec.etcd.peer_port, binary="etcd",
    )
    return ProcessSpec(
        name="etcd", role="etcd", argv=argv, host=facts.ip, port=spec.etcd.client_port,
        readiness=Probe(kind="tcp", host=facts.ip, port=spec.etcd.client_port), stop_timeout_s=10, generation=generation,
    )


def _engine_processes(
    spec: ClusterSpec, role_name: str, facts: NodeFacts, *, node_index: int, dp_master: NodeFacts | None,
    config_file: FileSpec, dp_size: int, ep_size: int, generation: int, restart_epoch: int,
) -> list[ProcessSpec]:
    """The node's engines of one role. `dp_size`/`ep_size`: the decode group's (1 for prefill);
    `restart_epoch`: the Mooncake master's, in each engine's spec (see `ProcessSpec.restart_epoch`)."""
    role: RoleSpec = spec.prefill if role_name == "prefill" else spec.decode
    per_node = role.engines_per_node
    decode = spec.decode
    config_path = config_file.path
    out = []
    for local in range(per_node):
        port = role.base_port + local
        rank = node_index * per_node + local
        in_group = role_name == "decode" and dp_size > 1
        values: dict[str, object] = {
            "model": spec.model, "port": port, "tp": role.tp, "node_ip": facts.ip, "node": facts.name,
            "dp_rank": rank if in_group else 0, "dp_rank_local": local if in_group else 0,
            "dp_size": dp_size, "ep_size": ep_size, "python": facts.python,
            "dp_master_ip": dp_master.ip if in_group and dp_master else facts.ip,
            "dp_master_port": decode.dp_master_port,
            "mooncake_config": config_path, "cluster": spec.cluster, "state_dir": facts.state_dir,
            "index": rank,
        }
        values["host"] = render(role.bind_host, values)
        # a {file:} or {credential:} value passes untouched: the agent reads it on the node
        env = {k: render(v, values) if isinstance(v, str) else v for k, v in {**spec.engine_env, **role.env}.items()}
        env["MOONCAKE_CONFIG_PATH"] = config_path
        env.update(engine_env(spec))
        argv = [render(item, values) for item in role.argv]
        if in_group and spec.engine == "vllm" and DP_FLAG not in argv:  # unless the argv templates them
            argv += [render(item, values) for item in VLLM_DP_ARGS]
        if in_group and spec.engine == "vllm-gaudi":
            assert dp_master is not None
            names = decode.dp_env
            env.update({
                names.size: str(dp_size), names.rank: str(rank), names.rank_local: str(local),
                names.master_ip: dp_master.ip, names.master_port: str(decode.dp_master_port),
                names.ep_size: str(ep_size),
            })
        if spec.benchmark.enabled:
            env.update(spec.benchmark.engine_env)
        out.append(ProcessSpec(
            name=f"{role_name}-{local}", role=role_name,
            argv=argv, env=env,
            cwd=role.cwd, host=facts.ip, port=port,
            readiness=Probe(kind="http", host=facts.ip, port=port, path=role.readiness.path,
                            period_s=role.readiness.period_s, timeout_s=role.readiness.timeout_s),
            restart=spec.policy.restart, stop_timeout_s=role.stop_timeout_s,
            start_timeout_s=role.readiness.start_timeout_s, generation=generation, restart_epoch=restart_epoch,
            dp_rank=rank if role_name == "decode" and decode.dp_mode == "group" else None,
            files=[config_file],  # every engine carries it: whichever starts first writes it
            drain=DrainSpec(timeout_s=role.drain_timeout_s),
        ))
    return out


def interleaved_decode_endpoints(plan_nodes: Sequence[NodePlan]) -> list[str]:
    """`ip0:8200 ip1:8200 ip0:8201 ip1:8201 ...`: the seed proxy's decode list order."""
    per_node = [[p.endpoint for p in n.processes if p.role == "decode" and p.endpoint] for n in plan_nodes]
    width = max((len(x) for x in per_node), default=0)
    return [lst[i] for i in range(width) for lst in per_node if i < len(lst)]


def _proxy_process(
    spec: ClusterSpec, facts: NodeFacts, *, prefill: Sequence[NodePlan], decode: Sequence[NodePlan],
    etcd_endpoints: list[str], generation: int,
) -> ProcessSpec:
    px = spec.proxy
    values: dict[str, object] = {
        "model": spec.model, "port": px.port, "node_ip": facts.ip, "node": facts.name, "host": facts.ip,
        "python": facts.python, "cluster": spec.cluster, "etcd_endpoints": ",".join(etcd_endpoints),
        "repeat_d_times": spec.benchmark.repeat_d_times, "first_token_from": px.first_token_from,
        "state_dir": facts.state_dir,
    }
    lists: dict[str, list[str]] = {
        "prefill_endpoints": [p.endpoint for n in prefill for p in n.processes if p.role == "prefill" and p.endpoint],
        "decode_endpoints": interleaved_decode_endpoints(decode),
        "first_token_args": px.first_token_args if px.first_token_from == "prefill" else [],
        "benchmark_args": px.benchmark_args if spec.benchmark.enabled else [],
    }
    argv: list[str] = []
    env = {k: render(v, values) for k, v in px.env.items()}
    if px.kind == "builtin":
        env |= proxy_etcd_env(facts.etcd_access)
        argv = [render(item, values) for item in (
            "{python}", "-m", "pdsupervisor.proxy", "--host", "{host}", "--port", "{port}",
            "--cluster", "{cluster}", "--etcd", "{etcd_endpoints}",
            "--routing-cache", "{state_dir}/proxy/{cluster}.routing.json",
        )]
        argv += proxy_etcd_args(facts.etcd_access)  # the proxy node's own credential files (paths, not templates)
        template = ["--workers", str(px.workers)] if px.workers > 1 else []
        if px.first_token_from == "prefill":
            template.append("--generator-on-p-node")
        if spec.benchmark.enabled:
            template += ["--benchmark-mode", "--repeat-d-times", "{repeat_d_times}"]
        template += px.extra_args
    else:
        template = px.argv
    for item in template:
        name = item[1:-1] if item.startswith("{") and item.endswith("}") else None
        if name in lists:
            argv += [render(x, values) for x in lists[name]]
        else:
            argv.append(render(item, values))
    return ProcessSpec(
        name="proxy", role="proxy", argv=argv, env=env,
        cwd=px.cwd, host=facts.ip, port=px.port,
        readiness=Probe(kind="http", host=facts.ip, port=px.port, path=px.readiness_path),
        restart=spec.policy.restart, stop_timeout_s=PROXY_STOP_TIMEOUT_S, start_timeout_s=px.start_timeout_s,
        generation=generation,
    )


def plan_cluster(
    spec: ClusterSpec, nodes: Mapping[str, NodeFacts], *,
    previous: Mapping[str, Sequence[str]] | None = None, generation: int = 0, restart_epoch: int = 0,
    group_epoch: int = 0, check_ports: bool = True, unmanaged: Collection[str] = (),
    recently_lost: Collection[str] = (),
) -> Plan:
    """(spec, registered nodes[, previous placement]) -> Plan, or PlanError naming what is short.
    Final: `generation` is in every process, `restart_epoch` (the master's) in every engine, plus
    `group_epoch` (restarts of the decode DP group as a whole) in each decode engine's.
    `check_ports=False`: a plan with two ports equal on a node too (see `port_problems`)."""
    placement = place(spec, nodes, previous, unmanaged, recently_lost)
    problems: list[tuple[str, str]] = []
    bootstrap = spec.etcd.bootstrap_node
    if spec.etcd.endpoints:
        etcd_endpoints = list(spec.etcd.endpoints)  # as given: an explicit scheme is kept (no TLS upgrade of http://)
    elif bootstrap is not None and bootstrap in nodes:
        etcd_endpoints = [f"{nodes[bootstrap].ip}:{spec.etcd.client_port}"]
    else:
        raise PlanError([("etcd.bootstrap_node", f"node {bootstrap} is not registered")])
    master_nodes, problems = choose_master_nodes(
        spec, nodes, spec.mooncake.master_node or bootstrap or placement["prefill"][0],
        [n for r in ENGINE_ROLES for n in placement[r]])
    master_node = master_nodes[0] if master_nodes else ""
    proxy_node = spec.proxy.node or placement["prefill"][0]
    if proxy_node not in nodes:
        problems.append(("proxy.node", f"node {proxy_node} is not registered"))
    # Every node at the control-plane client port too: agents may run members the spec does not list
    guarded = [*etcd_endpoints, *(f"{f.ip}:{spec.etcd.client_port}" for f in nodes.values())]
    problems += metadata_problems(spec, guarded) + ha_etcd_problems(spec, guarded)
    if problems:
        raise PlanError(problems)

    master_facts = nodes[master_node]
    master_address = master_server_address(spec, master_facts.ip)
    decode_nodes = placement["decode"]
    grouped = spec.decode.dp_mode == "group"
    dp_size = len(decode_nodes) * spec.decode.engines_per_node if grouped else 1
    ep_size = spec.decode.ep_size or dp_size * spec.decode.tp
    dp_master = nodes[decode_nodes[0]] if decode_nodes and dp_size > 1 else None
    plans: dict[str, NodePlan] = {}

    def node_plan(name: str) -> NodePlan:
        if name not in plans:
            plans[name] = NodePlan(node=name, ip=nodes[name].ip)
        return plans[name]

    if bootstrap is not None and bootstrap in nodes:  # that node's agent runs etcd; shown here, never assigned
        np_ = node_plan(bootstrap)
        np_.roles.append("etcd")
        np_.processes.append(_etcd_process(spec, nodes[bootstrap], generation=generation))
    if spec.mooncake.enabled:
        for name in master_nodes:
            mp = node_plan(name)
            mp.roles.append("mooncake-master")
            mp.processes.append(master_process(spec, nodes[name], generation=generation))

    for role_name in ENGINE_ROLES:
        for index, name in enumerate(placement[role_name]):
            facts = nodes[name]
            np_ = node_plan(name)
            np_.roles.append(role_name)
            np_.mooncake_config = mooncake_config(spec, facts, master_facts.ip)
            np_.mooncake_config_path = f"{facts.state_dir}/mooncake/{spec.cluster}.json"
            config_file = FileSpec(path=np_.mooncake_config_path,
                                   content=json.dumps(np_.mooncake_config, indent=2) + "\n")
            group_dp, group_ep = (dp_size, ep_size) if role_name == "decode" else (1, 1)
            # one number, so that an engine spec's hash changes with either epoch (a new field
            # in ProcessSpec would change every running process's hash, restarting them all)
            epoch = restart_epoch + group_epoch if role_name == "decode" else restart_epoch
            np_.processes += _engine_processes(spec, role_name, facts, node_index=index, dp_master=dp_master,
                                               config_file=config_file, dp_size=group_dp, ep_size=group_ep,
                                               generation=generation, restart_epoch=epoch)

    px = node_plan(proxy_node)
    px.roles.append("proxy")
    px.processes.append(_proxy_process(
        spec, nodes[proxy_node], prefill=[plans[n] for n in placement["prefill"]],
        decode=[plans[n] for n in decode_nodes], etcd_endpoints=etcd_endpoints, generation=generation,
    ))
    plan = Plan(
        cluster=spec.cluster, generation=generation, placement=placement, etcd_endpoints=etcd_endpoints,
        master_node=master_node, master_address=master_address, proxy_node=proxy_node,
        proxy_url=f"http://{nodes[proxy_node].ip}:{spec.proxy.port}", dp_size=dp_size,
        ep_size=ep_size,
        dp_master=dp_master.name if dp_master else None,
        nodes=dict(sorted(plans.items())), master_nodes=master_nodes if spec.mooncake.enabled else [],
    )
    clashes = port_problems(spec, plan) if check_ports else []
    if clashes:
        raise PlanError(clashes)
    return plan


_PORT_FIELD = {
    "etcd": "etcd.client_port", "mooncake-master": "mooncake.port", "prefill": "prefill.base_port",
    "decode": "decode.base_port", "proxy": "proxy.port",
}


@dataclass(frozen=True)
class PortClaim:
    port: int
    field: str  # the spec field that sets it
    holder: str  # what binds it: a process name, "etcd peer", "decode DP master"


def port_claims(spec: ClusterSpec, plan: Plan, node: str) -> list[PortClaim]:
    """Every port the plan binds on `node`, the etcd peer and DP rendezvous ports included."""
    np_ = plan.nodes.get(node)
    if np_ is None:
        return []
    claims = [PortClaim(p.port, _PORT_FIELD[p.role], p.name) for p in np_.processes if p.port is not None]
    md_port = metadata_port(spec)
    if "mooncake-master" in np_.roles and md_port is not None:
        claims.append(PortClaim(md_port, METADATA_PORT_FIELD, "mooncake-master metadata"))
    if "mooncake-master" in np_.roles and is_ha(spec):
        claims.append(PortClaim(spec.mooncake.metrics_port, "mooncake.metrics_port", "mooncake-master admin"))
    if "etcd" in np_.roles:
        claims.append(PortClaim(spec.etcd.peer_port, "etcd.peer_port", "etcd peer"))
    if node == plan.dp_master and plan.dp_size > 1:
        claims.append(PortClaim(spec.decode.dp_master_port, "decode.dp_master_port", "decode DP master"))
    return claims


def port_problems(spec: ClusterSpec, plan: Plan) -> list[tuple[str, str]]:
    """Two claims of one port on one node, as (field, why) pairs: (node, port) pairs must be unique."""
    problems: list[tuple[str, str]] = []
    for np_ in plan.nodes.values():
        seen: dict[int, str] = {}
        for port, field in ((c.port, c.field) for c in port_claims(spec, plan, np_.node)):
            if port in seen and seen[port] != field:
                problems.append((field, f"port {port} on node {np_.node} is also {seen[port]}"))
            elif port in seen:
                problems.append((field, f"port {port} on node {np_.node} is used twice"))
            seen[port] = field
    return problems
