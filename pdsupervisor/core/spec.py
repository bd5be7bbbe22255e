"""The cluster spec: everything the seed's scripts and hand edits set, as one validated document.

`load_spec(text)` is the only way in: it parses YAML or JSON, rejects unknown keys, runs the
cross-field checks, and raises `SpecError` listing every problem as `field.path: why`.
Every value is bounded (`limits`); `load_spec`, the submit path, also plans the spec on
trial members (`trial_checks`): it refuses what no registration can fix (two ports equal on a
node on every placement) and a node's assignment that would not fit in one etcd request (`sizing`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from pdsupervisor.core import limits
from pdsupervisor.core.admission import ENV_NAME_PATTERN, request_path_problem
from pdsupervisor.core.models import ENV_VALUE_TAGS, Duration, EnvValue, Port, RestartPolicy, Strict
from pdsupervisor.core.spec_checks import document_problems
from pdsupervisor.core.suggest import unknown_field

# Placeholders an engine argv item or env value may contain, e.g. "--port={port}".
ENGINE_PLACEHOLDERS = frozenset(
    {"model", "port", "tp", "node_ip", "node", "host", "dp_rank", "dp_rank_local", "dp_size",
     "dp_master_ip", "dp_master_port", "ep_size", "python", "mooncake_config", "cluster", "state_dir", "index"}
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


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill `{name}` placeholders inside one argv item; other braces (JSON) are left alone."""
    return PLACEHOLDER_RE.sub(
        lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template
    )


METADATA_MODES = ("p2p", "master-http")
METADATA_URL_RE = re.compile(r"^(https?|etcd|redis)://[^\s/]+(/\S*)?$")
# mooncake_master flags the planner sets for HA masters (the spec's own fields say them)
MOONCAKE_HA_FLAGS = frozenset({"enable_ha", "ha_backend_type", "ha_backend_connstring", "etcd_endpoints",
                               "cluster_id", "enable_oplog", "metrics_port", "rpc_port"})
HOST_PORT_RE = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")

DEFAULT_ENGINE_ARGV = [
    "{python}", "-m", "vllm.entrypoints.openai.api_server",
    "--model", "{model}", "--host", "{host}", "--port", "{port}", "-tp", "{tp}",
]


class SpecError(ValueError):
    """A spec that cannot run. `problems` holds (field path, reason) pairs."""

    def __init__(self, problems: Iterable[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{path}: {why}" for path, why in self.problems))


class SpecModel(Strict):
    """Base of the spec's sections: no string longer than limits.MAX_STRING (and, from `Strict`,
    unknown keys refused, floats finite). Lists and mappings are bounded field by field."""

    model_config = ConfigDict(str_max_length=limits.MAX_STRING)


def _args() -> Any:
    return Field(default_factory=list, max_length=limits.MAX_ARGS)


def _env() -> Any:
    return Field(default_factory=dict, max_length=limits.MAX_ENV)


class EtcdSpec(SpecModel):
    """Where the cluster's etcd is. Empty `endpoints` means: the bootstrap node's IP."""

    endpoints: list[str] = Field(default_factory=list, max_length=limits.MAX_ENDPOINTS)
    bootstrap_node: str | None = None
    client_port: Port = 2379
    peer_port: Port = 2380

    @field_validator("endpoints")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for item in v:
            host, _, port = item.split("://", 1)[-1].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{item!r} is not host:port")
        return v


class MooncakeSpec(SpecModel):
    """The Mooncake master and the per-node Mooncake JSON the engines read."""

    enabled: bool = True  # false: no master process (engines still get their Mooncake JSON)
    master_node: str | None = None  # default: the etcd bootstrap node
    port: Port = 50001
    binary: str = "mooncake_master"
    gc: bool = True
    # How GC is switched on: the seed's master takes `-enable_gc true`; newer masters have no
    # such flag (GC is always on there): set `gc_args: []` for them.
    gc_args: list[str] = Field(default_factory=lambda: ["-enable_gc", "true"], max_length=limits.MAX_ARGS)
    max_threads: int = Field(64, ge=1, le=limits.MAX_THREADS)
    extra_args: list[str] = Field(default_factory=lambda: ["--v=1"], max_length=limits.MAX_ARGS)  # may use {node_ip}, {port}
    protocol: Literal["auto", "tcp", "rdma"] = "auto"
    rdma_devices: list[str] = Field(
        default_factory=lambda: ["mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_8", "mlx5_9"],
        max_length=limits.MAX_LABELS,
    )
    global_segment_size: int = Field(53687091200, gt=0, le=limits.MAX_BYTES_SIZE)
    local_buffer_size: int = Field(10737418240, gt=0, le=limits.MAX_BYTES_SIZE)
    readiness_timeout_s: Duration = 60.0
    # Where transfer engines find each other's segments; never the control-plane etcd.
    # "p2p": no metadata server (P2PHANDSHAKE; Mooncake >= 0.3.7). "master-http": the master
    # serves it on `metadata_port` (>= 0.3.6). Or a URL of a metadata server run elsewhere.
    metadata: str = "p2p"
    metadata_port: int = Field(8080, ge=1, le=65535)  # used by "master-http" only
    # High availability (`replicas` >= 2): masters on different nodes elect a leader through
    # `ha_etcd`, an etcd of Mooncake's own (its client has no TLS nor auth: never the
    # control-plane etcd); engines find the leader there. 1: one master, as before.
    replicas: int = Field(1, ge=1, le=limits.MAX_MASTERS)
    master_nodes: list[str] = Field(default_factory=list, max_length=limits.MAX_NODES)  # where, in preference order
    ha_etcd: list[str] = Field(default_factory=list, max_length=limits.MAX_MASTERS)  # host:port of Mooncake's etcd
    # Replicate the leader's metadata (OpLog in ha_etcd) so KV put before a failover can be read
    # after it. Off by default: a PD hand-off reads its KV moments after the put, the OpLog writes
    # the leader's changes to ha_etcd, and restored objects held full segments (docs/benchmarks.md).
    ha_oplog: bool = False
    metrics_port: Port = 9003  # HA: each master's admin server; its /health is the readiness probe

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: str) -> str:
        if v not in METADATA_MODES and not METADATA_URL_RE.match(v):
            raise ValueError(f"{v!r}: give p2p, master-http or a URL (http://, etcd://, redis://)")
        return v

    @field_validator("ha_etcd")
    @classmethod
    def _ha_etcd(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not HOST_PORT_RE.match(e)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: give host:port (plain http: Mooncake's etcd client has no TLS)")
        return v


def _request_path(v: str) -> str:
    """A readiness path goes as is into the probe's request line: no CR, LF or space in it."""
    why = request_path_problem(v)
    if why:
        raise ValueError(why)
    return v


class ReadinessSpec(SpecModel):
    """Engine readiness: HTTP GET `path` answering 200 (vLLM: /health or /v1/models)."""

    path: str = "/health"
    period_s: Duration = 1.0
    timeout_s: Duration = 2.0
    start_timeout_s: Duration = 3600.0  # a DeepSeek-size load takes many minutes

    @field_validator("path")
    @classmethod
    def _request_path(cls, v: str) -> str:
        return _request_path(v)


class RoleSpec(SpecModel):
    """A prefill or decode role: which nodes, how many engines per node, how each is run."""

    nodes: int | None = Field(None, ge=1, le=limits.MAX_NODES)  # how many nodes (chosen among eligible members)
    node_names: list[str] = Field(default_factory=list, max_length=limits.MAX_NODES)  # explicit nodes, in DP-index order
    labels: dict[str, str] = Field(default_factory=dict, max_length=limits.MAX_LABELS)  # members must carry these labels
    tp: int = Field(8, ge=1, le=limits.MAX_SLOTS)
    slots: int = Field(8, ge=1, le=limits.MAX_SLOTS)  # accelerators per node this role uses (so engines per node too)
    base_port: Port = 8100
    bind_host: str = "{node_ip}"  # what {host} renders to; "0.0.0.0" to listen everywhere
    argv: list[str] = Field(default_factory=lambda: list(DEFAULT_ENGINE_ARGV), min_length=1, max_length=limits.MAX_ARGS)
    env: dict[str, EnvValue] = _env()  # over engine_env; {file: PATH} / {credential: NAME}
    readiness: ReadinessSpec = Field(default_factory=ReadinessSpec)
    stop_timeout_s: Duration = 60.0
    # before a planned stop (rollout, stop, replacement): out of the proxy's rotation, then
    # up to this long for the requests in flight to finish
    drain_timeout_s: Duration = 60.0
    cwd: str | None = None  # working directory of the engines (default: the agent's)

    @property
    def engines_per_node(self) -> int:
        return self.slots // self.tp


class DpEnvNames(SpecModel):
    """The environment variable names the decode engines read; rename for other engines."""

    size: str = Field("VLLM_DP_SIZE", pattern=ENV_NAME_PATTERN)
    rank: str = Field("VLLM_DP_RANK", pattern=ENV_NAME_PATTERN)
    rank_local: str = Field("VLLM_DP_RANK_LOCAL", pattern=ENV_NAME_PATTERN)
    master_ip: str = Field("VLLM_DP_MASTER_IP", pattern=ENV_NAME_PATTERN)
    master_port: str = Field("VLLM_DP_MASTER_PORT", pattern=ENV_NAME_PATTERN)
    ep_size: str = Field("VLLM_EP_SIZE", pattern=ENV_NAME_PATTERN)


class DecodeSpec(RoleSpec):
    base_port: Port = 8200
    tp: int = Field(1, ge=1, le=limits.MAX_SLOTS)
    ep_size: int | None = Field(None, ge=1, le=limits.MAX_NODES * limits.MAX_SLOTS)  # default: nodes x slots
    dp_master_port: Port = 25940
    dp_env: DpEnvNames = Field(default_factory=DpEnvNames)  # the `vllm-gaudi` profile's env names
    # `group`: the decode engines form one DP group (DP size = every engine); `independent`:
    # each engine is its own DP size 1, with no DP flags or env at all (upstream vLLM refuses
    # data parallelism for dense models)
    dp_mode: Literal["group", "independent"] = "group"
    # A DP group's ranks run collectives every step: when one dies (or its node is lost) the
    # others hang or fail, and a rank restarted alone cannot rejoin. `group` (the default)
    # restarts every rank together; `rank` only the one that died.
    group_restart: Literal["group", "rank"] = "group"


class ProxySpec(SpecModel):
    """The proxy in front. `builtin` follows engines live from etcd; `external` is an argv template."""

    kind: Literal["builtin", "external"] = "builtin"
    node: str | None = None  # default: the first prefill node
    port: Port = 8868
    first_token_from: Literal["decode", "prefill"] = "decode"
    argv: list[str] = _args()  # required when kind is external
    first_token_args: list[str] = Field(default_factory=lambda: ["--generator_on_p_node"], max_length=limits.MAX_ARGS)
    benchmark_args: list[str] = Field(
        default_factory=lambda: ["--benchmark_mode", "--repeat_p_request", "1", "--repeat_d_times", "{repeat_d_times}"],
        max_length=limits.MAX_ARGS,
    )
    env: dict[str, str] = _env()
    cwd: str | None = None  # e.g. where the seed's disagg_proxy_demo.py lives
    extra_args: list[str] = _args()  # appended to the built-in proxy's argv
    # built-in proxy processes on the port (`--workers`, rendered only when > 1: a spec without it plans as before)
    workers: int = Field(1, ge=1, le=64)
    readiness_path: str = "/health"
    start_timeout_s: Duration = 120.0

    @field_validator("readiness_path")
    @classmethod
    def _request_path(cls, v: str) -> str:
        return _request_path(v)


class BenchmarkSpec(SpecModel):
    """Benchmark mode: one prompt fills a decode batch of B; per-run overrides only."""

    enabled: bool = False
    decode_batch_size: int = Field(1, ge=1, le=limits.MAX_BATCH)
    master_gc: bool = False
    engine_env: dict[str, str] = Field(default_factory=lambda: {"VLLM_USE_ASYNC_TRANSFER_IN_PD": "0"}, max_length=limits.MAX_ENV)

    @property
    def repeat_d_times(self) -> int:
        return self.decode_batch_size - 1


class HostRequirements(SpecModel):
    thp_mode: str | None = "always"
    hugepages: int | None = Field(None, ge=0, le=limits.MAX_HUGEPAGES)
    hard: list[Literal["thp", "hugepages", "rdma", "accelerators"]] = Field(default_factory=list, max_length=4)


# An absolute count of engines, or a share of the role's engines (`25%`, rounded down, at least 1).
MaxUnavailable = Annotated[int, Field(ge=1, le=limits.MAX_NODES * limits.MAX_SLOTS)] | Annotated[
    str, Field(pattern=r"^(100|[1-9][0-9]?)%$")]


class RolloutSpec(SpecModel):
    """How running engines change (a replacing spec, a restart after the Mooncake master
    restarted): in waves of at most `max_unavailable` engines of a role not ready at once; the
    first wave is the canary. A decode DP group (DP size > 1) changes as one unit."""

    prefill: MaxUnavailable = "25%"
    decode: MaxUnavailable = "25%"

    def max_unavailable(self, role: str, engines: int) -> int:
        value: int | str = getattr(self, role)
        if isinstance(value, int):
            return value
        return max(1, engines * int(value[:-1]) // 100)


class PolicySpec(SpecModel):
    node_loss: Literal["wait", "replace"] = "wait"
    spare_nodes: list[str] = Field(default_factory=list, max_length=limits.MAX_NODES)  # empty with `replace`: any unused member
    # etcd's own minimum (a shorter TTL is granted as 2 s) to five minutes
    lease_ttl_s: int = Field(10, ge=limits.LEASE_TTL_MIN_S, le=limits.LEASE_TTL_MAX_S)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    start_timeout_s: Duration = 3600.0  # submit -> ready, for the whole cluster
    # `replace`: a node is replaced once its lease expired and none of its engines answered
    # the coordinator's probes for this long (an engine still serving is never duplicated)
    node_loss_grace_s: Duration = 10.0
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)


class ClusterSpec(SpecModel):
    """A whole PD cluster: the document `POST /cluster/start` and `pdsupervisor plan` take."""

    cluster: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    model: str
    # What the engines are, so the planner passes DP settings the way they read them:
    # `vllm-gaudi` (the seed's fork: `VLLM_DP_*` env, names in `decode.dp_env`), `vllm`
    # (upstream: `--data-parallel-*` flags appended to the decode argv, no DP env), `custom`
    # (argv and env exactly as given; the DP placeholders are there to use)
    engine: Literal["vllm-gaudi", "vllm", "custom"] = "vllm-gaudi"
    # values, or {file: PATH} / {credential: NAME}: a secret the agent reads on the node at each start
    engine_env: dict[str, EnvValue] = _env()
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


def _strings(values: Iterable[object]) -> list[str]:
    """Env values as placeholder checks see them: a file or credential is never rendered."""
    return [v if isinstance(v, str) else "" for v in values]


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
    problems += _placeholder_problems(f"{name}.env", _strings(role.env.values()), ENGINE_PLACEHOLDERS)
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
    problems += _placeholder_problems("engine_env", _strings(spec.engine_env.values()), ENGINE_PLACEHOLDERS)
    problems += _mooncake_ha_problems(spec.mooncake)
    if spec.benchmark.enabled and spec.benchmark.decode_batch_size < 2:
        problems.append(("benchmark.decode_batch_size", "benchmark mode needs a batch size of at least 2"))
    return problems


def _mooncake_ha_problems(mc: MooncakeSpec) -> list[tuple[str, str]]:
    """Masters on distinct nodes, an etcd of Mooncake's own to elect through, one metadata
    store that is not a single master's."""
    problems: list[tuple[str, str]] = []
    if len(set(mc.master_nodes)) != len(mc.master_nodes):
        problems.append(("mooncake.master_nodes", "a node is listed twice"))
    if mc.master_nodes and mc.master_node:
        problems.append(("mooncake.master_nodes", "give mooncake.master_node or mooncake.master_nodes, not both"))
    if mc.master_nodes and len(mc.master_nodes) < mc.replicas:
        problems.append(("mooncake.master_nodes", f"lists {len(mc.master_nodes)} nodes for {mc.replicas} replicas"))
    if mc.replicas == 1 or not mc.enabled:
        return problems
    if not mc.ha_etcd:
        problems.append(("mooncake.ha_etcd", f"replicas {mc.replicas} elect their leader through an etcd of "
                                             "Mooncake's own: give its host:port endpoints"))
    if mc.metadata == "master-http":
        problems.append(("mooncake.metadata", "master-http lives in one master, lost with it: use p2p (or a "
                                              "metadata server of its own) with replicas >= 2"))
    if mc.metrics_port == mc.port:
        problems.append(("mooncake.metrics_port", "same as mooncake.port"))
    taken = sorted({name for a in mc.extra_args if a.startswith("-")
                    if (name := a.lstrip("-").split("=", 1)[0]) in MOONCAKE_HA_FLAGS})
    if taken:
        problems.append(("mooncake.extra_args", f"{', '.join('-' + t for t in taken)}: set by the planner with "
                                                "replicas >= 2 (mooncake.ha_etcd, ha_oplog, metrics_port, port)"))
    return problems


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part in ENV_VALUE_TAGS:  # which kind of env value pydantic tried: not a field
            continue
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
            (_loc(e["loc"]), unknown_field(ClusterSpec, e["loc"]) if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        ) from None
    problems = _spec_problems(spec) + document_problems(spec.model_dump(mode="json"))
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
    """Parse YAML (JSON is YAML), validate, refuse what no registration can fix (a port clash
    on every placement), and check the assignments fit in etcd (`trial_checks`)."""
    try:
        if _too_deep(text):
            raise SpecError([("spec", f"nested deeper than {MAX_NESTING} levels")])
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("spec", f"not valid YAML/JSON: {exc}")]) from None
    except RecursionError:  # not expected after the depth check; never a crash of the caller
        raise SpecError([("spec", "nested too deeply")]) from None
    spec = validate_spec(data)
    from pdsupervisor.core.trial_checks import submit_problems  # it plans, and the planner imports this module

    problems = submit_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec
