"""What the pure cluster view costs per call at scale: no etcd, no processes.

A synthetic `Observed` of N nodes x 8 engines (half prefill, half decode, the built-in proxy)
is planned with the real planner and settled until every process is ready. Then, per
function, the median ms of a call on a *status-only change* (one node's status replaced by a
new object, as a new revision read from etcd gives), which is what the coordinator sees on
nearly every cycle: the coordinator's whole decision (`decide`: desired state, changes, phase,
with its `KnownEqual` kept from cycle to cycle), then `desired_state`, `changes`, `phase_of`,
`problems_of`, `observed_events`, `cluster_document` alone and with its JSON (what `GET /cluster`
makes per change), and the plan itself the first time (`try_plan`, cold). The cold plan makes
new process objects, so the observed assignments are not the plan's (as after a leader change):
`changes` and `phase_of` alone (no `KnownEqual`, no changes given) compare each one field by
field; `decide` and the document do not. CPU time, not wall
(the machine may be shared), each call after a full collection (it pays for the collections
its own garbage causes, not for an earlier call's).

    python bench/view_cost.py --nodes 64 256 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.coordinator import decide  # noqa: E402
from pdsupervisor.core import cluster_view  # noqa: E402
from pdsupervisor.core.cluster_view import KnownEqual, changes, cluster_document, desired_state, phase_of, problems_of  # noqa: E402
from pdsupervisor.core.document_json import DOCUMENT_JSON  # noqa: E402
from pdsupervisor.core.events import observed_events  # noqa: E402
from pdsupervisor.core.models import NodeAssignment, NodeFacts, NodeStatus, ProcessState, ProcessStatus  # noqa: E402
from pdsupervisor.core.observed import Observed, SpecRecord  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (bench/scale.py: the same spec)

ENGINES = 8


def spec_doc(nodes: list[str]) -> dict[str, Any]:
    """The scale bench's spec (bench/scale.py), at its default engine count."""
    return scale.spec_doc("bench", "127.0.0.1:2379", nodes, ENGINES)


def ready_status(node: str, lease: int, a: NodeAssignment, now: float) -> NodeStatus:
    return NodeStatus(node=node, updated_at=now, lease=lease, processes=[
        ProcessStatus(name=p.name, role=p.role, state=ProcessState.ready, pid=4000 + i, started_at=now,
                      spec_hash=p.spec_hash(), generation=p.generation, endpoint=p.endpoint, ready_after_s=1.0)
        for i, p in enumerate(a.processes)])


def settled(n: int) -> Observed:
    """N members, the spec planned and written, every assigned process ready."""
    names = [f"node{i:04d}" for i in range(n)]
    members = {name: NodeFacts(name=name, ip=f"127.0.{i // 250}.{i % 250 + 1}", lease=i + 1, accelerators=ENGINES)
               for i, name in enumerate(names)}
    obs = Observed(record=SpecRecord(generation=1, spec=spec_doc(names), submitted_at=time.time()),
                   members=members, assignments={}, statuses={})
    for _ in range(5):
        desired = desired_state(obs, time.time())
        todo = changes(obs, desired)
        if not todo:
            return obs
        assignments = {k: a for k, a in desired.assignments.items() if a is not None}
        now = time.time()
        obs = dataclasses.replace(obs, record=desired.record, assignments=assignments, statuses={
            node: ready_status(node, members[node].lease, a, now) for node, a in assignments.items()})
    raise RuntimeError("the synthetic cluster did not settle")


def median_ms(fn: Callable[[Observed], object], variants: list[Observed]) -> float:
    times = []
    for obs in variants:
        gc.collect()  # each call pays for the collections its own garbage causes, not the last one's
        start = time.process_time()  # CPU, not wall: the machine is shared
        fn(obs)
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def status_changes(obs: Observed, count: int) -> list[Observed]:
    """`count` observations, each with one node's status written anew (its decoded copy)."""
    nodes = sorted(obs.statuses)
    out = []
    for i in range(count):
        node = nodes[(i * 7) % len(nodes)]
        fresh = NodeStatus.model_validate_json(obs.statuses[node].model_dump_json())
        fresh = fresh.model_copy(update={"updated_at": fresh.updated_at + i + 1})
        out.append(dataclasses.replace(obs, statuses={**obs.statuses, node: fresh}, revision=obs.revision + i + 1))
    return out


def run(n: int, calls: int) -> dict[str, float]:
    obs = settled(n)
    memo = getattr(cluster_view, "PLANS", None)
    if memo is not None:
        memo.clear()
    start = time.process_time()
    cluster_view.try_plan(obs)
    cold = (time.process_time() - start) * 1000
    variants = status_changes(obs, calls)
    now = time.time()
    desired = desired_state(obs, now)
    phase = phase_of(obs, desired)
    known = KnownEqual()
    decide(obs, obs, now, known)  # the coordinator's loop keeps it from cycle to cycle
    return {
        "try_plan (cold)": cold,
        "decide (a cycle)": median_ms(lambda o: decide(o, o, now, known), variants),
        "desired_state": median_ms(lambda o: desired_state(o, now), variants),
        "changes": median_ms(lambda o: changes(o, desired), variants),
        "phase_of": median_ms(lambda o: phase_of(o, desired), variants),
        "problems_of": median_ms(lambda o: problems_of(o, desired.spec, phase, now), variants),
        "observed_events": median_ms(lambda o: observed_events(obs, o), variants),
        "cluster_document": median_ms(lambda o: cluster_document(o, now), variants),
        "document + JSON": median_ms(lambda o: DOCUMENT_JSON.body(cluster_document(o, now)), variants),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--calls", type=int, default=7, help="status-only changes timed per function")
    args = parser.parse_args()
    rows = {n: run(n, args.calls) for n in args.nodes}
    names = list(next(iter(rows.values())))
    print(f"{'ms per call':<20}" + "".join(f"{n:>10}" for n in args.nodes))
    for name in names:
        print(f"{name:<20}" + "".join(f"{rows[n][name]:>10.1f}" for n in args.nodes))


if __name__ == "__main__":
    main()
