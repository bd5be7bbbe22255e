"""Host preflight: pure checks of a node's facts against a cluster spec and its plan.

Every check returns a `CheckResult` saying what it found, what the spec needs and the exact
command a person runs to fix it, so nobody has to remember the guide's hand steps
(`echo always > .../transparent_hugepage/enabled`, `echo 32768 > /proc/sys/vm/nr_hugepages`,
`ibdev2netdev`). No I/O here: `doctor_command` gathers facts, ports and probes and prints.

Status: OK; WARN (a miss the spec does not make hard, or something only worth knowing);
FAIL (a hard requirement missed, or something that cannot work, e.g. a port already taken).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.mooncake import metadata_port, transport
from pdsupervisor.core.planner import ENGINE_ROLES, Plan, port_claims
from pdsupervisor.core.spec import ClusterSpec

Status = Literal["OK", "WARN", "FAIL"]
THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGEPAGES_FILE = "/proc/sys/vm/nr_hugepages"
CLOCK_WARN_S = 2.0  # the HTTP Date header has 1 s resolution: smaller offsets are noise


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    found: str
    needed: str
    fix: str = ""


@dataclass(frozen=True)
class EtcdProbe:
    """What the command learned from `GET <etcd>/version`: reachability and the clock offset."""

    endpoint: str  # as asked: a URL
    error: str | None = None
    version: str = ""
    offset_s: float | None = None  # local clock minus etcd's Date header; None: not measured
    refused: bool = False  # the TLS handshake failed (a certificate refused): etcd is there, and wrongly reached
    tls: bool = False  # asked over TLS (doctor's --etcd-ca)


ETCD_TLS_FIX = ("give --etcd-ca, --etcd-cert and --etcd-key: this node's etcd_tls files "
                "(`pdsupervisor pki`: nodes/<name>/ca.crt, client.crt, client.key)")


def _miss(spec: ClusterSpec, hard_name: str) -> Status:
    return "FAIL" if hard_name in spec.host_requirements.hard else "WARN"


def check_thp(spec: ClusterSpec, facts: NodeFacts) -> CheckResult:
    """The guide sets THP to `always`; engines load markedly slower otherwise."""
    want = spec.host_requirements.thp_mode
    found = facts.thp_mode or "unknown"
    if want is None:
        return CheckResult("thp", "OK", found, "any (host_requirements.thp_mode is null)")
    if facts.thp_mode == want:
        return CheckResult("thp", "OK", found, want)
    return CheckResult("thp", _miss(spec, "thp"), found, want, f"echo {want} > {THP_FILE}")


def check_hugepages(spec: ClusterSpec, facts: NodeFacts) -> CheckResult:
    """`nr_hugepages` must reach the spec's count (32768 in the guide) before engines start."""
    want = spec.host_requirements.hugepages
    total = facts.hugepages_total
    found = "unknown" if total is None else str(total)
    if want is None:
        return CheckResult("hugepages", "OK", found, "any (host_requirements.hugepages not set)")
    if total is not None and total >= want:
        return CheckResult("hugepages", "OK", found, f">= {want}")
    return CheckResult("hugepages", _miss(spec, "hugepages"), found, f">= {want}", f"echo {want} > {HUGEPAGES_FILE}")


def check_hugepages_free(spec: ClusterSpec, facts: NodeFacts) -> CheckResult:
    """Free pages: only a warning, since this cluster's own running engines hold some."""
    want = spec.host_requirements.hugepages
    free = facts.hugepages_free
    found = "unknown" if free is None else f"{free} of {facts.hugepages_total}"
    if want is None or (free is not None and free >= want):
        return CheckResult("hugepages_free", "OK", found, "any" if want is None else f">= {want} before start")
    return CheckResult("hugepages_free", "WARN", found, f">= {want} before start",
                       "stop what holds hugepages (grep -l huge /proc/*/smaps), or raise nr_hugepages")


def check_rdma(spec: ClusterSpec, facts: NodeFacts) -> CheckResult:
    """Allowed devices present and Up (`/sys/class/infiniband/*/ports/*/state`), as `ibdev2netdev` shows."""
    mc = spec.mooncake
    allow = mc.rdma_devices
    needed = f"a port ACTIVE on one of {', '.join(allow) or '(empty allow-list)'}"
    by_name = {d.name: d for d in facts.rdma_devices}
    parts: list[str] = []
    fixes: list[str] = []
    for name in allow:
        dev = by_name.get(name)
        if dev is None:
            continue
        netdevs = sorted({n for p in dev.ports for n in p.netdevs})
        states = "/".join(p.state for p in dev.ports) or "no ports"
        parts.append(f"{name} {'Up' if dev.up else 'Down'} ({states}{'; ' + ','.join(netdevs) if netdevs else ''})")
        if not dev.up:
            fixes += [f"ip link set dev {n} up" for n in netdevs] or [f"ibstat {name}"]
    absent = [n for n in allow if n not in by_name]
    others = sorted(set(by_name) - set(allow))
    if absent:
        parts.append(f"absent: {', '.join(absent)}")
    if others:
        parts.append(f"not in allow-list: {', '.join(others)}")
    found = "; ".join(parts) or "no RDMA devices"
    if mc.protocol == "tcp":
        return CheckResult("rdma", "OK", found, "none (mooncake.protocol is tcp)")
    up = facts.rdma_up(allow)
    if not up:
        status: Status = "FAIL" if mc.protocol == "rdma" else _miss(spec, "rdma")
        fix = "; ".join(fixes) or ("ibdev2netdev; add this node's device to mooncake.rdma_devices"
                                   if others else "ibdev2netdev  # no RDMA device: Mooncake falls back to tcp")
        return CheckResult("rdma", status, found, needed, fix)
    if fixes:  # some usable, some allowed devices down: engines on those ranks lose RDMA
        return CheckResult("rdma", "WARN", found, needed, "; ".join(fixes))
    return CheckResult("rdma", "OK", found, needed)


def check_protocol(spec: ClusterSpec, facts: NodeFacts) -> CheckResult:
    """The Mooncake protocol this node's facts give, decided exactly as the planner does."""
    protocol, device = transport(spec, facts)
    found = protocol + (f" via {device}" if device else "")
    needed = f"mooncake.protocol {spec.mooncake.protocol}"
    if spec.mooncake.protocol == "auto" and protocol == "tcp":
        return CheckResult("mooncake_protocol", "WARN", found, needed + " (rdma when a device is Up)",
                           "see the rdma check")
    return CheckResult("mooncake_protocol", "OK", found, needed)


def slots_needed(spec: ClusterSpec, roles: Collection[str]) -> tuple[int, str]:
    """Accelerators the node's roles use; with no known role, the smaller role (it might get either)."""
    engine_roles = [r for r in roles if r in ENGINE_ROLES]
    if engine_roles:
        want = max(spec.prefill.slots if r == "prefill" else spec.decode.slots for r in engine_roles)
        return want, f">= {want} ({', '.join(engine_roles)})"
    want = min(spec.prefill.slots, spec.decode.slots)
    return want, f">= {want} (prefill {spec.prefill.slots}, decode {spec.decode.slots}; no role planned here)"


def check_accelerators(spec: ClusterSpec, facts: NodeFacts, roles: Collection[str]) -> CheckResult:
    want, needed = slots_needed(spec, roles)
    if facts.accelerators >= want:
        return CheckResult("accelerators", "OK", str(facts.accelerators), needed)
    return CheckResult("accelerators", _miss(spec, "accelerators"), str(facts.accelerators), needed,
                       "ls /dev/accel /dev/davinci* /dev/nvidia*  # driver loaded? or lower the role's slots")


def mooncake_checks(spec: ClusterSpec, facts: NodeFacts) -> list[CheckResult]:
    """RDMA and the Mooncake protocol; skipped (OK, saying so) when Mooncake is disabled:
    nothing here moves a KV cache, so neither matters."""
    if not spec.mooncake.enabled:
        return [CheckResult(c, "OK", "skipped: mooncake.enabled is false", "none") for c in ("rdma", "mooncake_protocol")]
    return [check_rdma(spec, facts), check_protocol(spec, facts)]


def fact_checks(spec: ClusterSpec, facts: NodeFacts, roles: Collection[str]) -> list[CheckResult]:
    """Everything decidable from a node's registered facts alone (also what `--cluster` shows)."""
    return [
        check_thp(spec, facts), check_hugepages(spec, facts), check_hugepages_free(spec, facts),
        *mooncake_checks(spec, facts), check_accelerators(spec, facts, roles),
    ]


def ports_needed(spec: ClusterSpec, plan: Plan | None, node: str) -> dict[int, str]:
    """Port -> what needs it on `node`. Without a plan: every port any role might put here."""
    if plan is not None:
        return {c.port: c.holder for c in port_claims(spec, plan, node)}
    out = {spec.etcd.client_port: "etcd", spec.etcd.peer_port: "etcd peer", spec.proxy.port: "proxy",
           spec.decode.dp_master_port: "decode DP master"}
    if spec.mooncake.enabled:
        out[spec.mooncake.port] = "mooncake-master"
    md_port = metadata_port(spec)
    if md_port is not None:
        out[md_port] = "mooncake-master metadata"
    for name, role in (("prefill", spec.prefill), ("decode", spec.decode)):
        out.update({role.base_port + i: f"{name}-{i}" for i in range(role.engines_per_node)})
    return out


def held_by_cluster(holders: Mapping[int, Collection[int]], cluster_pids: Mapping[int, str]) -> dict[int, str]:
    """Port -> the supervised process holding it, for each port whose holders (the pids listening
    on it) are all this node's own supervised processes or their children: `cluster_pids` maps
    every pid of those process trees to its process's name (the bootstrap etcd included).

    A port with no known holder (not root: another user's socket) is not the cluster's."""
    out: dict[int, str] = {}
    for port, pids in holders.items():
        if pids and all(pid in cluster_pids for pid in pids):
            names = sorted({cluster_pids[pid] for pid in pids})
            out[port] = f"{', '.join(names)} (pid {', '.join(map(str, sorted(pids)))})"
    return out


def check_ports(needed: Mapping[int, str], taken: Mapping[int, str], ours: Mapping[int, str] | None = None) -> CheckResult:
    """`taken`: port -> who holds it (as the command found). A taken port means a process cannot bind,
    unless it is in `ours` (port -> this node's supervised process holding it, `held_by_cluster`):
    then the cluster is running here, and the port is where it belongs."""
    ours = ours or {}
    want = ", ".join(f"{p} ({w})" for p, w in sorted(needed.items())) or "none"
    clash = sorted(p for p in needed if p in taken and p not in ours)
    held = sorted(p for p in needed if p in taken and p in ours)
    found_ours = ", ".join(f"{p} held by this node's {ours[p]} (needed by {needed[p]})" for p in held)
    if not clash:
        return CheckResult("ports", "OK", f"free, or the cluster's own: {found_ours}" if held else "all free", want)
    found = ", ".join(f"{p} taken{' by ' + taken[p] if taken[p] else ''} (needed by {needed[p]})" for p in clash)
    if held:
        found += f"; {found_ours}"
    return CheckResult("ports", "FAIL", found, want, "; ".join(f"ss -ltnp 'sport = :{p}'" for p in clash))


def model_is_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def check_model(spec: ClusterSpec, present: bool | None) -> CheckResult:
    """`present`: whether the spec's model path exists here (None: the model is a hub id)."""
    if present is None or not model_is_path(spec.model):
        return CheckResult("model", "OK", "hub id, not a path", spec.model)
    if present:
        return CheckResult("model", "OK", "present", spec.model)
    return CheckResult("model", "FAIL", "absent", spec.model, f"ls -ld {Path(spec.model).parent}  # mount or copy the model")


def check_etcd(probe: EtcdProbe | None) -> list[CheckResult]:
    """etcd reachable, and the clock offset against it (leases and events use wall clocks)."""
    if probe is None:
        return [CheckResult("etcd", "WARN", "not measured: endpoint unknown", "reachable",
                            "give --etcd HOST:PORT or --node for the bootstrap node"),
                CheckResult("clock", "WARN", "not measured", f"offset < {CLOCK_WARN_S:g}s")]
    if probe.error is not None:
        found = probe.error if probe.endpoint in probe.error else f"{probe.endpoint}: {probe.error}"
        if probe.refused:
            etcd = CheckResult("etcd", "FAIL", found, "reachable with this node's etcd certificates", ETCD_TLS_FIX)
        else:
            curl = "curl --cacert CA --cert CERT --key KEY" if probe.tls else "curl"
            fix = f"{curl} {probe.endpoint}/version  # is the bootstrap node's agent running?"
            etcd = CheckResult("etcd", "WARN", found, "reachable", fix if probe.tls else f"{fix} A TLS etcd: {ETCD_TLS_FIX}")
        return [etcd, CheckResult("clock", "WARN", "not measured (etcd unreachable)", f"offset < {CLOCK_WARN_S:g}s")]
    etcd = CheckResult("etcd", "OK", f"{probe.endpoint} {probe.version}".strip(), "reachable")
    if probe.offset_s is None:
        return [etcd, CheckResult("clock", "WARN", "not measured (no Date header)", f"offset < {CLOCK_WARN_S:g}s")]
    found = f"{probe.offset_s:+.1f}s against {probe.endpoint} (1s resolution)"
    if abs(probe.offset_s) < CLOCK_WARN_S:
        return [etcd, CheckResult("clock", "OK", found, f"offset < {CLOCK_WARN_S:g}s")]
    return [etcd, CheckResult("clock", "WARN", found, f"offset < {CLOCK_WARN_S:g}s", "chronyc tracking; timedatectl")]


def planned_roles(plan: Plan | None, node: str) -> list[str]:
    np_ = plan.nodes.get(node) if plan is not None else None
    return list(np_.roles) if np_ is not None else []


def hard_failures(
    spec: ClusterSpec, facts_by_node: Mapping[str, NodeFacts], plan: Plan,
) -> list[tuple[str, str, str]]:
    """(node, check, why) for every planned engine node missing a requirement listed in `hard`.

    Only nodes with an engine role are judged: a spare or a proxy-only node needs no hugepages,
    and refusing a cluster over a node it does not use helps nobody.
    """
    hard = set(spec.host_requirements.hard)
    if not hard:
        return []
    out: list[tuple[str, str, str]] = []
    for node, np_ in plan.nodes.items():
        facts = facts_by_node.get(node)
        if facts is None or not any(r in ENGINE_ROLES for r in np_.roles):
            continue
        for result in fact_checks(spec, facts, np_.roles):
            if result.check in hard and result.status == "FAIL":
                out.append((node, result.check, f"found {result.found}, needs {result.needed}"))
    return out


def worst(results: Collection[CheckResult]) -> Status:
    statuses = {r.status for r in results}
    return "FAIL" if "FAIL" in statuses else ("WARN" if "WARN" in statuses else "OK")


def planned_fixes(spec: ClusterSpec, facts: NodeFacts) -> list[tuple[str, str, str]]:
    """(check, absolute path, value) that `--fix` may write: THP and nr_hugepages, never lowering it."""
    out: list[tuple[str, str, str]] = []
    want_thp = spec.host_requirements.thp_mode
    if want_thp is not None and facts.thp_mode != want_thp:
        out.append(("thp", THP_FILE, want_thp))
    want_pages = spec.host_requirements.hugepages
    if want_pages is not None and (facts.hugepages_total or 0) < want_pages:
        out.append(("hugepages", HUGEPAGES_FILE, str(want_pages)))
    return out
