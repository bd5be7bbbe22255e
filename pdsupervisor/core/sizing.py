"""Will the spec's assignments fit in etcd? Measured on a trial plan when the spec is submitted.

etcd refuses any request over its `--max-request-bytes` (1.5 MiB by default). The coordinator
writes the assignments it changes and the spec record in transactions of a bounded size
(`Store.write_as_leader`), one key at least: so each node's assignment, and the spec record,
must fit in one request, whatever the number of nodes. A spec that would make one of them
pass `limits.MAX_WRITE_BYTES` is refused, naming the field that makes it big (`decode.argv`,
`engine_env`...): otherwise it would be accepted and then never written.

The trial plan places the spec on made-up members (the named nodes, or as many as the roles
count, each with the role's labels) with the longest IPv4 address; the real members' IPs,
state dirs and interpreter paths differ by a few bytes per placeholder, which the margin below
etcd's limit absorbs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

from pdsupervisor.core.limits import ETCD_MAX_REQUEST_BYTES, MAX_WRITE_BYTES
from pdsupervisor.core.models import NodeAssignment, NodeFacts, ProcessSpec
from pdsupervisor.core.planner import ENGINE_ROLES, Plan, PlanError, plan_cluster
from pdsupervisor.core.spec import ClusterSpec, RoleSpec

TRIAL_IP = "255.255.255.255"
TRIAL_STATE_DIR = "/var/lib/pdsupervisor"
TRIAL_PYTHON = "/usr/local/bin/python3"


def trial_slots(spec: ClusterSpec) -> dict[str, list[str]]:
    """Each engine role's nodes on the trial members: the named ones, or made-up ones (their
    names sort role by role, so each role's count-based pick finds its own)."""
    roles: dict[str, RoleSpec] = {"prefill": spec.prefill, "decode": spec.decode}
    return {role_name: list(role.node_names) or [f"{order}-trial-{role_name}-{i}" for i in range(role.nodes or 0)]
            for order, (role_name, role) in enumerate(roles.items())}


def trial_members(spec: ClusterSpec) -> dict[str, NodeFacts]:
    """Members the spec can be placed on: every node it names, and made-up ones for counts."""
    members: dict[str, NodeFacts] = {}

    def add(name: str, labels: Mapping[str, str]) -> None:
        members.setdefault(name, NodeFacts(name=name, ip=TRIAL_IP, labels=dict(labels), state_dir=TRIAL_STATE_DIR,
                                           python=TRIAL_PYTHON))

    for role_name, names in trial_slots(spec).items():
        role: RoleSpec = spec.prefill if role_name == "prefill" else spec.decode
        for name in names:
            add(name, role.labels)
    for named in (spec.etcd.bootstrap_node, spec.mooncake.master_node, spec.proxy.node, *spec.mooncake.master_nodes):
        if named:
            add(named, {})
    for i in range(spec.mooncake.replicas if spec.mooncake.replicas > 1 and not spec.mooncake.master_nodes else 0):
        add(f"9-trial-mooncake-master-{i}", {})  # HA masters need distinct nodes: more can register
    return members


def _json_len(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=lambda m: m.model_dump(mode="json")))


def contributions(spec: ClusterSpec, processes: list[ProcessSpec]) -> Counter[str]:
    """Bytes of the processes' JSON by the spec field they come from; what no field explains
    (probes, restart policy, the Mooncake JSON, DP variables) counts for the role's node count."""
    out: Counter[str] = Counter()
    for p in processes:
        parts: Counter[str] = Counter()
        if p.role in ENGINE_ROLES:
            role: RoleSpec = spec.prefill if p.role == "prefill" else spec.decode
            parts[f"{p.role}.argv"] = _json_len(p.argv)
            for k, v in p.env.items():
                if spec.benchmark.enabled and k in spec.benchmark.engine_env:
                    parts["benchmark.engine_env"] += _json_len({k: v})
                elif k in role.env:
                    parts[f"{p.role}.env"] += _json_len({k: v})
                elif k in spec.engine_env:
                    parts["engine_env"] += _json_len({k: v})
            rest = f"{p.role}.nodes"
        elif p.role == "proxy":
            parts["proxy.argv" if spec.proxy.kind == "external" else "proxy.extra_args"] = _json_len(p.argv)
            parts["proxy.env"] = _json_len(p.env)
            rest = "proxy"
        else:
            parts["mooncake.extra_args"] = _json_len(p.argv)
            rest = "mooncake"
        out.update(parts)
        out[rest] += max(0, len(p.model_dump_json()) - sum(parts.values()))
    return out


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MiB"


def plan_size_problems(spec: ClusterSpec, plan: Plan) -> list[tuple[str, str]]:
    """The plan's biggest assignment, and the spec record, each against MAX_WRITE_BYTES."""
    assignments = {
        node: NodeAssignment(node=node, generation=plan.generation,
                             processes=[p for p in np_.processes if p.role != "etcd"])
        for node, np_ in plan.nodes.items()
    }
    sizes = {node: len(a.model_dump_json()) for node, a in assignments.items() if a.processes}
    # the record holds the spec and the placement (every node's name once)
    record = _json_len(spec.model_dump(mode="json")) + _json_len(plan.placement)
    if record > MAX_WRITE_BYTES:
        return [("spec", f"the spec record would take {_mib(record)}, over the {_mib(MAX_WRITE_BYTES)} allowed: "
                         f"etcd refuses requests over {_mib(ETCD_MAX_REQUEST_BYTES)} (--max-request-bytes)")]
    biggest = max(sizes, key=lambda n: sizes[n], default=None)
    if biggest is None or sizes[biggest] <= MAX_WRITE_BYTES:
        return []
    field, size = contributions(spec, assignments[biggest].processes).most_common(1)[0]
    engines = sum(1 for p in assignments[biggest].processes if p.role in ENGINE_ROLES)
    return [(field, (
        f"the assignment of {biggest} would take {_mib(sizes[biggest])} ({engines} engines), over the "
        f"{_mib(MAX_WRITE_BYTES)} allowed: the coordinator writes each node's assignment in one etcd request "
        f"and etcd refuses requests over {_mib(ETCD_MAX_REQUEST_BYTES)} (--max-request-bytes); "
        f"{field} makes {_mib(size)} of it"
    ))]


def write_size_problems(spec: ClusterSpec) -> list[tuple[str, str]]:
    """`plan_size_problems` on a trial plan. A spec that cannot be placed even there (a port
    clash) is not measured: `trial_checks.submit_problems` says why instead."""
    try:
        plan = plan_cluster(spec, trial_members(spec))
    except PlanError:
        return []
    return plan_size_problems(spec, plan)
