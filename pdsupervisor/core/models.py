"""Boundary types shared by the planner, the coordinator, the agents and the REST API.

Everything that crosses etcd or HTTP is one of these pydantic models, serialised as JSON.
The agent knows nothing about prefill or decode: it runs `ProcessSpec`s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from pdsupervisor.core.limits import MAX_DURATION_S, MAX_PATH

Role = Literal["etcd", "mooncake-master", "prefill", "decode", "proxy"]


class Strict(BaseModel):
    """Base for every boundary model: unknown keys are an error, never silently dropped, and
    a float is finite (NaN or infinity would make a timer, a sleep or a comparison meaningless)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Port = Annotated[int, Field(ge=1, le=65535)]
Duration = Annotated[float, Field(gt=0, le=MAX_DURATION_S)]  # seconds: positive, a week at most


class Probe(Strict):
    """How to tell a process is ready: HTTP GET answering 200, or a TCP connect."""

    kind: Literal["http", "tcp"] = "http"
    host: str = "127.0.0.1"
    port: Port
    path: str = "/health"
    period_s: Duration = 1.0
    timeout_s: Duration = 2.0


class RestartPolicy(Strict):
    """Exponential backoff with jitter, reset after a stable period; never a silent give-up.

    `mode`: `always` restarts on any exit, `on-failure` only on a non-zero exit or a signal,
    `never` leaves it exited (reported as such).
    """

    mode: Literal["always", "on-failure", "never"] = "always"
    initial_backoff_s: Duration = 1.0
    max_backoff_s: Duration = 60.0
    multiplier: float = Field(2.0, ge=1, le=100)
    jitter: float = Field(0.2, ge=0, le=1)
    reset_after_s: Duration = 60.0


class FileSpec(Strict):
    """A file the agent writes atomically before the process starts (e.g. the Mooncake JSON)."""

    path: str
    content: str
    mode: int = 0o644


CREDENTIAL_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,254}$"  # a file name: no '/', not '.' or '..'


class EnvFromFile(Strict):
    """An env value the agent reads from a file on its node each time it starts the process:
    a secret stays on the node, etcd holds only the path. One trailing newline is dropped."""

    model_config = ConfigDict(frozen=True)

    file: str = Field(max_length=MAX_PATH)

    @field_validator("file")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or "\0" in v:
            raise ValueError("must be an absolute path")
        return v


class EnvFromCredential(Strict):
    """An env value the agent reads from one of its systemd credentials (`LoadCredential=` in
    its unit): the file `$CREDENTIALS_DIRECTORY/<credential>`, read at each start."""

    model_config = ConfigDict(frozen=True)

    credential: str = Field(pattern=CREDENTIAL_NAME_PATTERN)


# Tags of the env value kinds: what a validation error's location shows after the variable
# (`engine_env.HF_TOKEN.env-file.file`); `spec._loc` leaves them out.
ENV_VALUE_TAGS = frozenset({"env-value", "env-file", "env-credential"})


def _env_value_kind(v: Any) -> str:
    if isinstance(v, EnvFromFile) or (isinstance(v, dict) and "credential" not in v):
        return "env-file"
    if isinstance(v, EnvFromCredential | dict):
        return "env-credential"
    return "env-value"


# A process's env value: the value itself, or where the agent reads it at start (secrets).
EnvValue = Annotated[
    Annotated[str, Tag("env-value")] | Annotated[EnvFromFile, Tag("env-file")]
    | Annotated[EnvFromCredential, Tag("env-credential")],
    Discriminator(_env_value_kind),
]


INFLIGHT_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


class DrainSpec(Strict):
    """How to empty an engine before a planned stop: it leaves the proxy's rotation (its status
    says `stopping`), then the agent waits until the engine's in-flight gauges (summed over
    their labels, read from its Prometheus `path`) are zero, at most `timeout_s`."""

    timeout_s: Duration = 60.0
    path: str = "/metrics"
    inflight_metrics: list[str] = Field(default_factory=lambda: list(INFLIGHT_METRICS), max_length=16)


class ProcessSpec(Strict):
    """One process an agent must keep running: everything needed to start, probe and stop it."""

    name: str
    role: Role
    argv: list[str] = Field(min_length=1)
    env: dict[str, EnvValue] = Field(default_factory=dict)  # files and credentials read at each start
    cwd: str | None = None
    files: list[FileSpec] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: Port | None = None
    readiness: Probe | None = None
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    stop_signal: Literal["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP"] = "SIGTERM"
    stop_timeout_s: Duration = 30.0
    start_timeout_s: Duration | None = None  # not ready this long after starting: a problem
    generation: int = 0
    dp_rank: int | None = None
    # Bumped by the coordinator to restart a process that runs the very same thing, e.g. the
    # engines after their Mooncake master restarted and lost its metadata. Part of the hash.
    restart_epoch: int = 0
    drain: DrainSpec | None = None  # None: stopped at once (no requests to finish)

    def spec_hash(self) -> str:
        """Stable digest of everything that, when changed, requires a restart (so neither the
        generation nor how to drain: changing those never restarts a process).

        Computed once per object (the view asks it of every process several times a cycle:
        ~70 us each, seconds at 1,024 nodes): kept in the instance's `__dict__`, outside the
        fields (pydantic's `==` and dumps ignore it), and dropped when a field is set or a copy
        updates one. Nested values (a list or dict field) must not be mutated in place.
        """
        cached: str | None = self.__dict__.get(_HASH_KEY)
        if cached is None:
            payload = self.model_dump(mode="json", exclude=set(NOT_HASHED))
            blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
            cached = self.__dict__[_HASH_KEY] = hashlib.sha256(blob).hexdigest()[:16]
        return cached

    def __setattr__(self, name: str, value: Any) -> None:
        _forget(self)
        super().__setattr__(name, value)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> ProcessSpec:
        copied = super().model_copy(update=update, deep=deep)
        if update:
            _forget(copied)
        return copied

    @property
    def endpoint(self) -> str | None:
        return f"{self.host}:{self.port}" if self.port is not None else None


NOT_HASHED = frozenset({"generation", "drain"})


_HASH_KEY = "_spec_hash"  # where spec_hash() keeps its digest, in the instance __dict__
_SAME_KEY = "_same_spec"  # where same_spec() keeps (other, answer) in the first one's __dict__
_KEPT_KEYS = (_HASH_KEY, _SAME_KEY)


def _forget(spec: ProcessSpec) -> None:
    for key in _KEPT_KEYS:
        spec.__dict__.pop(key, None)


def same_spec(a: ProcessSpec, b: ProcessSpec) -> bool:
    """`a.spec_hash() == b.spec_hash()`, without hashing when the two are equal anyway (the
    usual case, and ~10x cheaper than hashing an object fresh from etcd), and without
    comparing again when asked of the same two objects as last time (an assignment the
    cluster cache keeps against the plan the memo keeps: every engine, every cycle). The
    answer is kept in `a` (as `spec_hash` keeps its digest), holding `b`: no id is reused."""
    if a is b:
        return True
    kept: tuple[ProcessSpec, bool] | None = a.__dict__.get(_SAME_KEY)
    if kept is not None and kept[0] is b:
        return kept[1]
    same = a == b or a.spec_hash() == b.spec_hash()
    a.__dict__[_SAME_KEY] = (b, same)
    return same


class NodeAssignment(Strict):
    """Desired state of one node, written by the coordinator under the leader key."""

    node: str
    generation: int = 0
    processes: list[ProcessSpec] = Field(default_factory=list)


class ProcessState(str, Enum):  # noqa: UP042 - StrEnum changes str() of a member, which logs and tables show
    starting = "starting"
    running = "running"
    ready = "ready"
    backoff = "backoff"
    stopping = "stopping"
    exited = "exited"
    failed = "failed"


class ProcessStatus(Strict):
    """What an agent observes about one process."""

    name: str
    role: Role
    state: ProcessState
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    started_at: float | None = None  # wall clock, for people; never used for timeouts
    uptime_s: float | None = None
    spec_hash: str = ""
    generation: int = 0
    endpoint: str | None = None
    dp_rank: int | None = None
    message: str = ""
    # wall clock: when this run of the process, ready before, stopped passing its readiness
    # probe (state `running` since); None while ready, before its first ready, or from an agent
    # that predates the field
    ready_lost_at: float | None = None
    # Why its last start or run failed, in one line (`spawn failed: ...`, `killed by SIGKILL (9)`,
    # `exit code 1: RuntimeError: ...`), and when (wall clock). Kept while it starts again.
    # Fields below default to "nothing known": an older agent's status still validates.
    last_failure: str | None = None
    last_failure_at: float | None = None
    # failed starts and runs since it last ran `restart.reset_after_s`: 2 or more is a crash loop
    failures_in_a_row: int = 0
    down_since: float | None = None  # wall clock: its first failure since it was last ready
    # wall clock: when it was last ready again after failing, and how long after `down_since`
    ready_again_at: float | None = None
    ready_again_after_s: float | None = None
    # how a stop of this run had to end, when SIGKILL did it: `SIGKILL after 30 s (SIGTERM ignored)`
    last_stop: str | None = None
    # seconds from this run's start to its first ready: what a restart of it costs
    ready_after_s: float | None = None
    # The assignment asks for a new spec (this hash) the node refused before stopping anything:
    # what runs (`spec_hash`, `state`) is the previous spec, still serving; `refused` says why.
    refused_spec_hash: str | None = None
    refused: str | None = None

    @property
    def crash_looping(self) -> bool:
        return self.failures_in_a_row >= CRASH_LOOP_FAILURES


CRASH_LOOP_FAILURES = 2  # failures in a row that make a crash loop


class StopEscalation(Strict):
    """A stop that took SIGKILL: the agent reports the last few, so the event survives the
    process leaving the status (stopped because its assignment dropped it)."""

    process: str
    at: float  # wall clock
    how: str  # `SIGKILL after 30 s (SIGTERM ignored)`


class NodeStatus(Strict):
    node: str
    updated_at: float
    processes: list[ProcessStatus] = Field(default_factory=list)
    lease: int = 0  # the member lease of the agent that wrote it
    stops_escalated: list[StopEscalation] = Field(default_factory=list)  # the last few, oldest first

    def current_for(self, member: NodeFacts | None) -> bool:
        """Written by the agent that holds the node's member key now (same lease).

        A status key outlives a dead agent; until the restarted agent reports, what it says
        about pids and readiness is history, not observation. Lease ids, not clocks, decide.
        """
        return member is not None and self.lease == member.lease


class RdmaPort(Strict):
    port: int
    state: str  # e.g. "ACTIVE", "DOWN" (from /sys/class/infiniband/<dev>/ports/<n>/state)
    netdevs: list[str] = Field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.state.upper() == "ACTIVE"


class RdmaDevice(Strict):
    name: str
    ports: list[RdmaPort] = Field(default_factory=list)

    @property
    def up(self) -> bool:
        return any(p.up for p in self.ports)


class TlsFiles(Strict):
    """A TLS identity as files on a node: the trusted CA bundle, a certificate and its key."""

    ca_file: str
    cert_file: str
    key_file: str


class EtcdAccess(Strict):
    """How processes on a node reach etcd: file paths on that node, never their contents
    (a secret in etcd would be readable by whoever reads etcd)."""

    tls: TlsFiles | None = None  # the node's etcd client certificate
    username: str | None = None  # etcd RBAC (an external etcd); the password stays in password_file
    password_file: str | None = None
    # a digest of the CA and certificate files as registered: when they are replaced
    # (rotation), what runs with them is restarted to read them again
    fingerprint: str | None = None


class NodeFacts(Strict):
    """What an agent registers about its node under its lease (`members/<node>`)."""

    name: str
    ip: str
    ips: list[str] = Field(default_factory=list)  # every IPv4 address of the host
    hostname: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    cpu_count: int = 0
    memory_bytes: int = 0
    accelerators: int = 8
    rdma_devices: list[RdmaDevice] = Field(default_factory=list)
    hugepages_total: int | None = None
    hugepages_free: int | None = None
    thp_mode: str | None = None
    agent_version: str = ""
    api_url: str = ""
    state_dir: str = "/var/lib/pdsupervisor"
    python: str = "python3"  # the agent's interpreter: what {python} renders to in argv templates
    etcd_access: EtcdAccess | None = None  # the agent's own etcd credentials (paths), for the built-in proxy
    registered_at: float = 0.0
    lease: int = 0  # the lease this record is held by (set by the agent when it registers)

    def rdma_up(self, allow: list[str] | None = None) -> list[str]:
        """Names of RDMA devices with a port up, restricted to `allow` when given."""
        return [
            d.name for d in self.rdma_devices if d.up and (not allow or d.name in allow)
        ]
