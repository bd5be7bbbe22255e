"""The cluster spec: everything the seed's scripts and hand edits set, as one validated document.

`load_spec(text)` is the only way in: it parses YAML or JSON, rejects unknown keys, runs the
cross-field checks, and raises `SpecError` listing every problem as `field.path: why`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from pdsupervisor.core.models import RestartPolicy, Strict

# Placeholders an engine argv item or env value may contain, e.g. "--port={port}".
ENGINE_PLACEHOLDERS = frozenset(
    {"model", "port", "tp", "node_ip", "node", "host", "dp_rank", "dp_rank_local", "dp_size",
     "ep_size", "python", "mooncake_config", "cluster", "state_dir", "index"}
)
# Placeholders of the proxy argv. The `*_endpoints` and `*_args` ones must be whole items:
# they expand to several argv items.
PROXY_PLACEHOLDERS = frozenset(
    {"model", "port", "node_ip", "node", "host", "python", "cluster", "etcd_endpoints",
     "repeat_d_times", "first_token_from", "state_dir"}
)
PROXY_LIST_PLACEHOLDERS = frozenset(
    {"prefill_endpoints", "decode_endpoints", "first_token_args", "benchmark_args"}
)
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

DEFAULT_ENGINE_ARGV = [
    "{python}", "-m", "vllm.entrypoints.openai.api_server",
    "--model", "{model}", "--host", "{host}", "--port", "{port}", "-tp", "{tp}",
]


class SpecError(ValueError):
    """A spec that cannot run. `problems` holds (field path, reason) pairs."""

    def __init__(self, problems: Iterable[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{path}: {why}" for path, why in self.problems))


class EtcdSpec(Strict):
    """Where the cluster's etcd is. Empty `endpoints` means: the bootstrap node's IP."""

    endpoints: list[str] = Field(default_factory=list)
    bootstrap_node: str | None = None
    client_port: int = Field(2379, ge=1, le=65535)
    peer_port: int = Field(2380, ge=1, le=65535)

    @field_validator("endpoints")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for item in v:
            host, _, port = item.split("://", 1)[-1].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{item!r} is not host:port")
        return v


class MooncakeSpec(Strict):
    """The Mooncake master and the per-node Mooncake JSON the engines read."""

    enabled: bool = True  # false: no master process (engines still get their Mooncake JSON)
    master_node: str | None = None  # default: the etcd bootstrap node
    port: int = Field(50001, ge=1, le=65535)
    binary: str = "mooncake_master"
    gc: bool = True
    # How GC is switched on: the seed's master takes `-enable_gc true`; newer masters have no
    # such flag (GC is always on there): set `gc_args: []` for them.
    gc_args: list[str] = Field(default_factory=lambda: ["-enable_gc", "true"])
    max_threads: int = Field(64, ge=1)
    extra_args: list[str] = Field(default_factory=lambda: ["--v=1"])  # may use {node_ip}, {port}
    protocol: Literal["auto", "tcp", "rdma"] = "auto"
    rdma_devices: list[str] = Field(
        default_factory=lambda: ["mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_8", "mlx5_9"]
    )
    global_segment_size: int = Field(53687091200, gt=0)
    local_buffer_size: int = Field(10737418240, gt=0)
    readiness_timeout_s: float = Field(60.0, gt=0)


class ReadinessSpec(Strict):
    """Engine readiness: HTTP GET `path` answering 200 (vLLM: /health or /v1/models)."""

    path: str = "/health"
    period_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    start_timeout_s: float = Field(3600.0, gt=0)  # a DeepSeek-size load takes many minutes


class RoleSpec(Strict):
    """A prefill or decode role: which nodes, how many engines per node, how each is run."""

    nodes: int | None = Field(None, ge=1)  # how many nodes (chosen among eligible members)
    node_names: list[str] = Field(default_factory=list)  # explicit nodes, in DP-index order
    labels: dict[str, str] = Field(default_factory=dict)  # members must carry these labels
    tp: int = Field(8, ge=1)
    slots: int = Field(8, ge=1)  # accelerators per node this role uses
    base_port: int = Field(8100, ge=1, le=65535)
    bind_host: str = "{node_ip}"  # what {host} renders to; "0.0.0.0" to listen everywhere
    argv: list[str] = Field(default_factory=lambda: list(DEFAULT_ENGINE_ARGV), min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    readiness: ReadinessSpec = Field(default_factory=ReadinessSpec)
    stop_timeout_s: float = Field(60.0, gt=0)
    cwd: str | None = None  # working directory of the engines (default: the agent's)

    @property
    def engines_per_node(self) -> int:
        return self.slots // self.tp


class DpEnvNames(Strict):
    """The environment variable names the decode engines read; rename for other engines."""

    size: str = "VLLM_DP_SIZE"
    rank: str = "VLLM_DP_RANK"
    rank_local: str = "VLLM_DP_RANK_LOCAL"
    master_ip: str = "VLLM_DP_MASTER_IP"
    master_port: str = "VLLM_DP_MASTER_PORT"
    ep_size: str = "VLLM_EP_SIZE"


class DecodeSpec(RoleSpec):
    base_port: int = Field(8200, ge=1, le=65535)
    tp: int = Field(1, ge=1)
    ep_size: int | None = Field(None, ge=1)  # default: nodes x slots (every decode accelerator)
    dp_master_port: int = Field(25940, ge=1, le=65535)
    dp_env: DpEnvNames = Field(default_factory=DpEnvNames)


class ProxySpec(Strict):
    """The proxy in front. `builtin` follows engines live from etcd; `external` is an argv template."""

    kind: Literal["builtin", "external"] = "builtin"
    node: str | None = None  # default: the first prefill node
    port: int = Field(8868, ge=1, le=65535)
    first_token_from: Literal["decode", "prefill"] = "decode"
    argv: list[str] = Field(default_factory=list)  # required when kind is external
    first_token_args: list[str] = Field(default_factory=lambda: ["--generator_on_p_node"])
    benchmark_args: list[str] = Field(
        default_factory=lambda: ["--benchmark_mode", "--repeat_p_request", "1", "--repeat_d_times", "{repeat_d_times}"]
    )
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None  # e.g. where the seed's disagg_proxy_demo.py lives
    extra_args: list[str] = Field(default_factory=list)  # appended to the built-in proxy's argv
    readiness_path: str = "/health"
    start_timeout_s: float = Field(120.0, gt=0)


class BenchmarkSpec(Strict):
    """Benchmark mode: one prompt fills a decode batch of B; per-run overrides only."""

    enabled: bool = False
    decode_batch_size: int = Field(1, ge=1)
    master_gc: bool = False
    engine_env: dict[str, str] = Field(default_factory=lambda: {"VLLM_USE_ASYNC_TRANSFER_IN_PD": "0"})

    @property
    def repeat_d_times(self) -> int:
        return self.decode_batch_size - 1


class HostRequirements(Strict):
    thp_mode: str | None = "always"
    hugepages: int | None = Field(None, ge=0)
    hard: list[Literal["thp", "hugepages", "rdma", "accelerators"]] = Field(default_factory=list)


class PolicySpec(Strict):
    node_loss: Literal["wait", "replace"] = "wait"
    spare_nodes: list[str] = Field(default_factory=list)  # empty with `replace`: any unused member
    lease_ttl_s: int = Field(10, ge=2)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    start_timeout_s: float = Field(3600.0, gt=0)  # submit -> ready, for the whole cluster


class ClusterSpec(Strict):
    """A whole PD cluster: the document `POST /cluster/start` and `pdsupervisor plan` take."""

    cluster: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    model: str
    engine_env: dict[str, str] = Field(default_factory=dict)
    etcd: EtcdSpec = Field(default_factory=EtcdSpec)
    mooncake: MooncakeSpec = Field(default_factory=MooncakeSpec)
    prefill: RoleSpec
    decode: DecodeSpec
    proxy: ProxySpec = Field(default_factory=ProxySpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    host_requirements: HostRequirements = Field(default_factory=HostRequirements)


def _placeholder_problems(path: str, items: Iterable[str], allowed: frozenset[str],
                          whole_items: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    problems = []
    for i, item in enumerate(items):
        if item in {f"{{{n}}}" for n in whole_items}:
            continue
        for name in PLACEHOLDER_RE.findall(item):
            if name in whole_items:
                problems.append((f"{path}[{i}]", f"{{{name}}} expands to several items and must stand alone"))
            elif name not in allowed:
                problems.append((f"{path}[{i}]", f"unknown placeholder {{{name}}}; known: {', '.join(sorted(allowed))}"))
    return problems


def _role_problems(name: str, role: RoleSpec) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if role.slots % role.tp:
        problems.append((f"{name}.tp", f"{name}.slots ({role.slots}) is not divisible by {name}.tp ({role.tp})"))
    if role.nodes is None and not role.node_names:
        problems.append((f"{name}.nodes", "give a node count or node_names"))
    if role.nodes is not None and role.node_names and role.nodes != len(role.node_names):
        problems.append((f"{name}.nodes", f"{role.nodes} but node_names lists {len(role.node_names)}"))
    if len(set(role.node_names)) != len(role.node_names):
        problems.append((f"{name}.node_names", "a node is listed twice"))
    if role.base_port + role.engines_per_node - 1 > 65535:
        problems.append((f"{name}.base_port", "engine ports run past 65535"))
    problems += _placeholder_problems(f"{name}.argv", role.argv, ENGINE_PLACEHOLDERS)
    problems += _placeholder_problems(f"{name}.env", role.env.values(), ENGINE_PLACEHOLDERS)
    return problems


def _spec_problems(spec: ClusterSpec) -> list[tuple[str, str]]:
    """Cross-field checks that need no membership."""
    problems = _role_problems("prefill", spec.prefill) + _role_problems("decode", spec.decode)
    d = spec.decode
    decode_nodes = d.nodes or len(d.node_names)
    if d.ep_size is not None and decode_nodes and d.slots % d.tp == 0 and d.ep_size != decode_nodes * d.slots:
        problems.append((
            "decode.ep_size",
            f"{d.ep_size} is not consistent with {decode_nodes} decode nodes x {d.slots} slots / TP {d.tp}: "
            f"DP size would be {decode_nodes * d.slots // d.tp}, so EP = DP size x TP = {decode_nodes * d.slots}",
        ))
    overlap = set(spec.prefill.node_names) & set(d.node_names)
    if overlap:
        problems.append(("decode.node_names", f"{', '.join(sorted(overlap))} also listed under prefill.node_names"))
    if spec.policy.node_loss == "replace":
        taken = set(spec.prefill.node_names) | set(d.node_names)
        clash = taken & set(spec.policy.spare_nodes)
        if clash:
            problems.append(("policy.spare_nodes", f"{', '.join(sorted(clash))} already has a role"))
    if not spec.etcd.endpoints and not spec.etcd.bootstrap_node:
        problems.append(("etcd", "give etcd.endpoints or etcd.bootstrap_node"))
    if spec.etcd.client_port == spec.etcd.peer_port:
        problems.append(("etcd.peer_port", "same as etcd.client_port"))
    if spec.proxy.kind == "external" and not spec.proxy.argv:
        problems.append(("proxy.argv", "required when proxy.kind is external"))
    problems += _placeholder_problems(
        "proxy.argv", spec.proxy.argv, PROXY_PLACEHOLDERS, PROXY_LIST_PLACEHOLDERS
    )
    for name in ("benchmark_args", "first_token_args", "extra_args"):
        problems += _placeholder_problems(f"proxy.{name}", getattr(spec.proxy, name), PROXY_PLACEHOLDERS)
    problems += _placeholder_problems("engine_env", spec.engine_env.values(), ENGINE_PLACEHOLDERS)
    if spec.benchmark.enabled and spec.benchmark.decode_batch_size < 2:
        problems.append(("benchmark.decode_batch_size", "benchmark mode needs a batch size of at least 2"))
    return problems


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "spec"


def validate_spec(data: Any) -> ClusterSpec:
    """A parsed document -> ClusterSpec, or SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError([("spec", "must be a mapping (YAML or JSON object)")])
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(
            (_loc(e["loc"]), "unknown field" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        ) from None
    problems = _spec_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


MAX_NESTING = 32  # levels of mappings and sequences; a real spec has about 5


def _too_deep(text: str | bytes) -> bool:
    """True when the document nests more than MAX_NESTING collections. Read from the parser's
    events (a loop, no recursion) before anything is built: composing a deeply nested document
    recurses once per level and would blow the stack."""
    depth = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return False


def load_spec(text: str | bytes) -> ClusterSpec:
    """Parse YAML (JSON is YAML) and validate."""
    try:
        if _too_deep(text):
            raise SpecError([("spec", f"nested deeper than {MAX_NESTING} levels")])
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("spec", f"not valid YAML/JSON: {exc}")]) from None
    except RecursionError:  # not expected after the depth check; never a crash of the caller
        raise SpecError([("spec", "nested too deeply")]) from None
    return validate_spec(data)
