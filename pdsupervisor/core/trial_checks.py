"""What is checked on a trial plan when a spec is submitted (`spec.load_spec`): first what no
registration can fix, then whether the assignments fit in etcd (`sizing`).

The trial plan places the spec on made-up members (`sizing.trial_members`), each engine role on
its own slots: the nodes it names, or made-up nodes of its own for a count. Some processes share
a node on every placement: the proxy and the Mooncake master sit on the first prefill node unless
the spec names theirs, etcd on its bootstrap node, the decode DP rendezvous on the first decode
node, and a node the spec names for two things holds both. Two of them on one port can never
start, whichever nodes register: such a spec is refused (`POST /cluster/start` answers 400)
instead of staying `pending`. So is a spec that cannot be placed even on the trial members (a
Mooncake metadata URL naming the control-plane etcd of `etcd.endpoints`). A clash that depends on
where a count-based role lands (on the node `mooncake.master_node` names, say) is the planner's to
report when it plans on the real members, in `missing`, as are nodes not registered yet.
"""

from __future__ import annotations

from pdsupervisor.core.planner import PlanError, plan_cluster, port_problems
from pdsupervisor.core.sizing import plan_size_problems, trial_members, trial_slots
from pdsupervisor.core.spec import ClusterSpec


def _made_up_nodes(spec: ClusterSpec) -> dict[str, str]:
    """Made-up member name -> how to say it ("prefill node #1")."""
    return {name: f"{role} node #{i + 1}" for role, names in trial_slots(spec).items()
            if not (spec.prefill if role == "prefill" else spec.decode).node_names
            for i, name in enumerate(names)}


def _said(spec: ClusterSpec, problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    made_up = _made_up_nodes(spec)
    out = []
    for field, why in problems:
        for name, said in made_up.items():
            why = why.replace(f"node {name} ", f"{said} ")
        out.append((field, why))
    return out


def submit_problems(spec: ClusterSpec) -> list[tuple[str, str]]:
    """What no node joining can fix (the spec cannot be placed even on its trial members, or two
    of its ports clash on a node on every placement); else whether the assignments fit in etcd."""
    try:
        plan = plan_cluster(spec, trial_members(spec), previous=trial_slots(spec), check_ports=False)
    except PlanError as exc:
        return _said(spec, exc.problems)
    clashes = port_problems(spec, plan)
    return _said(spec, clashes) if clashes else plan_size_problems(spec, plan)
