"""Mooncake in the plan: the master's process and each engine node's Mooncake JSON.

Mooncake's metadata (where transfer engines find each other's segments) never lives in the
control-plane etcd: that etcd holds what every agent executes, and Mooncake's own etcd client
has neither TLS nor auth, so an engine able to reach it could write it. `mooncake.metadata`
picks the store instead (checked against mooncake-transfer-engine 0.3.13, see
tests/e2e/test_mooncake_kv.py):
- `p2p` (default): `P2PHANDSHAKE`, no metadata server at all; each transfer engine answers
  its peers' handshakes itself (the Store supports it from Mooncake 0.3.7);
- `master-http`: the master's built-in HTTP metadata server on `metadata_port` (0.3.6+);
- a URL: a metadata server run elsewhere (an http server, a second etcd holding nothing an
  agent acts on). One naming a control-plane etcd endpoint is refused.

High availability (`mooncake.replicas` >= 2, mooncake_master's `--enable_ha` with its etcd
backend): masters on distinct nodes elect a leader in `mooncake.ha_etcd`, an etcd of Mooncake's
own (refused when it is a control-plane endpoint, for the reason above); only the leader opens
its RPC port, so a master is ready when its admin server's `/health` answers (a standby too).
Engines' `master_server_address` is `etcd://<ha_etcd>` and `MC_STORE_CLUSTER_ID` their
environment: the store client follows the leader there. Checked against 0.3.13 (README, "Mooncake
master HA"): after the leader is killed, hand-offs resume in the same engines (~10-20 s); KV put
before the kill is lost unless `ha_oplog` (off by default, see the spec).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pdsupervisor.core.models import NodeFacts, Probe, ProcessSpec
from pdsupervisor.core.spec import ClusterSpec, render

METADATA_PORT_FIELD = "mooncake.metadata_port"


def metadata_server(spec: ClusterSpec, master_ip: str) -> str:
    """The JSON's `metadata_server` for this spec, with the master on `master_ip`."""
    mc = spec.mooncake
    if mc.metadata == "p2p":
        return "P2PHANDSHAKE"
    if mc.metadata == "master-http":
        return f"http://{master_ip}:{mc.metadata_port}/metadata"
    return mc.metadata


LOCAL_HOSTS = ("localhost", "0.0.0.0", "::1")  # and 127.0.0.0/8


def _host_port(endpoint: str) -> tuple[str, str]:
    host, _, port = endpoint.strip().split("://", 1)[-1].lower().rpartition(":")
    return host, port


def control_plane_named(endpoints: Collection[str], etcd_endpoints: Sequence[str]) -> list[str]:
    """Those of `endpoints` (host:port) that reach the control-plane etcd: one of its endpoints
    (host names compared without case), or this node's own address at one of its ports (an
    agent's member listens on 127.0.0.1 too; a master or engine on that node would reach it)."""
    control = {_host_port(e) for e in etcd_endpoints}
    ports = {port for _, port in control}
    return sorted({e for e in endpoints if (hp := _host_port(e)) in control
                   or (hp[1] in ports and (hp[0] in LOCAL_HOSTS or hp[0].startswith("127.")))})


def metadata_problems(spec: ClusterSpec, etcd_endpoints: Sequence[str]) -> list[tuple[str, str]]:
    """An explicit metadata URL must not name the control-plane etcd (engines would write it)."""
    md = spec.mooncake.metadata
    if "://" not in md:
        return []
    hosts = {h.strip() for h in md.split("://", 1)[1].split("/", 1)[0].split(",")}
    shared = control_plane_named(hosts, etcd_endpoints)
    if shared:
        return [("mooncake.metadata", f"{', '.join(shared)} is the control-plane etcd: engines must not reach "
                                      "it; use p2p, master-http or a store of Mooncake's own")]
    return []


HA_CLUSTER_ENV = "MC_STORE_CLUSTER_ID"  # the store client's name for the master's `-cluster_id`


def is_ha(spec: ClusterSpec) -> bool:
    """Several masters electing a leader (engines survive a master's death)."""
    return spec.mooncake.enabled and spec.mooncake.replicas > 1


def master_server_address(spec: ClusterSpec, master_ip: str) -> str:
    """Where engines find the master: the one master, or the HA set's etcd."""
    mc = spec.mooncake
    return "etcd://" + ";".join(mc.ha_etcd) if is_ha(spec) else f"{master_ip}:{mc.port}"


def engine_env(spec: ClusterSpec) -> dict[str, str]:
    """What an engine's store client needs in its environment to follow the HA set."""
    return {HA_CLUSTER_ENV: spec.cluster} if is_ha(spec) else {}


def ha_etcd_problems(spec: ClusterSpec, etcd_endpoints: Sequence[str]) -> list[tuple[str, str]]:
    """Mooncake's election etcd must not be the control-plane etcd (its client has no TLS nor auth)."""
    shared = control_plane_named(spec.mooncake.ha_etcd, etcd_endpoints)
    if shared and is_ha(spec):
        return [("mooncake.ha_etcd", f"{', '.join(shared)} is the control-plane etcd: Mooncake's client has "
                                     "neither TLS nor auth; give an etcd that holds nothing an agent acts on")]
    return []


def choose_master_nodes(spec: ClusterSpec, registered: Collection[str], first: str,
                        engine_nodes: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The masters' nodes, distinct: `master_nodes` in order, else `first` then the engine nodes
    then the other members by name, skipping unregistered ones. (nodes, problems)."""
    mc = spec.mooncake
    replicas = mc.replicas if mc.enabled else 1  # Mooncake off: no master runs, however many the spec keeps
    if replicas == 1 and not mc.master_nodes:
        ok = first in registered
        return [first], [] if ok else [("mooncake.master_node", f"node {first} is not registered")]
    pool = mc.master_nodes or [first, *engine_nodes, *sorted(registered)]
    chosen = [n for n in dict.fromkeys(pool) if n in registered][:replicas]
    if len(chosen) < replicas:
        among = " among mooncake.master_nodes" if mc.master_nodes else ""
        return chosen, [("mooncake.replicas", f"{replicas} masters need {replicas} distinct registered "
                                              f"nodes{among}; found {len(chosen)}: {', '.join(chosen) or 'none'}")]
    return chosen, []


def metadata_port(spec: ClusterSpec) -> int | None:
    """The port a planned master also binds for metadata (`master-http`), else None."""
    mc = spec.mooncake
    return mc.metadata_port if mc.enabled and mc.metadata == "master-http" else None


def transport(spec: ClusterSpec, facts: NodeFacts) -> tuple[str, str]:
    """(protocol, device_name) on this node. `auto`: rdma only when an allowed device is up."""
    mc = spec.mooncake
    up = facts.rdma_up(mc.rdma_devices)
    protocol = mc.protocol if mc.protocol != "auto" else ("rdma" if up else "tcp")
    device = (up[0] if up else (mc.rdma_devices[0] if mc.rdma_devices else "")) if protocol == "rdma" else ""
    return protocol, device


def mooncake_config(spec: ClusterSpec, facts: NodeFacts, master_ip: str) -> dict[str, object]:
    """The node's Mooncake JSON (vLLM's field names), the master on `master_ip`."""
    mc = spec.mooncake
    protocol, device = transport(spec, facts)
    return {
        "local_hostname": facts.ip,
        "metadata_server": metadata_server(spec, master_ip),
        "protocol": protocol,
        "device_name": device,
        "master_server_address": master_server_address(spec, master_ip),
        "global_segment_size": mc.global_segment_size,
        "local_buffer_size": mc.local_buffer_size,
    }


def master_process(spec: ClusterSpec, facts: NodeFacts, *, generation: int) -> ProcessSpec:
    """The master on its node. `master-http` adds its metadata server, asked to bind the node IP
    (0.3.13 still listens on every interface: upstream only logs the host)."""
    mc = spec.mooncake
    gc = mc.gc and not (spec.benchmark.enabled and not spec.benchmark.master_gc)
    values = {"node_ip": facts.ip, "port": mc.port}
    argv = [mc.binary, *(mc.gc_args if gc else []), "-max_threads", str(mc.max_threads), "-port", str(mc.port)]
    if mc.metadata == "master-http":
        argv += ["-enable_http_metadata_server=true", "-http_metadata_server_host", facts.ip,
                 "-http_metadata_server_port", str(mc.metadata_port)]
    argv += [render(a, values) for a in mc.extra_args]
    readiness = Probe(kind="tcp", host=facts.ip, port=mc.port)
    if is_ha(spec):  # a standby never opens its RPC port: ready when its admin server answers
        # last, so that they win (the spec refuses extra_args setting them: HA_FLAGS); the leader
        # publishes its rpc_address in the etcd, so it is the node's IP, never 0.0.0.0
        argv += ["-enable_ha=true", "-ha_backend_type", "etcd", "-etcd_endpoints", ";".join(mc.ha_etcd),
                 "-cluster_id", spec.cluster, f"-enable_oplog={str(mc.ha_oplog).lower()}",
                 "-rpc_address", facts.ip, "-metrics_host", facts.ip, "-metrics_port", str(mc.metrics_port)]
        readiness = Probe(kind="http", host=facts.ip, port=mc.metrics_port, path="/health")
    return ProcessSpec(
        name="mooncake-master", role="mooncake-master", argv=argv, host=facts.ip, port=mc.port,
        readiness=readiness,
        restart=spec.policy.restart, stop_timeout_s=10, start_timeout_s=mc.readiness_timeout_s, generation=generation,
    )
