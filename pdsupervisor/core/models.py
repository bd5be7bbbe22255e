"""Boundary types shared by the planner, the coordinator, the agents and the REST API.

Everything that crosses etcd or HTTP is one of these pydantic models, serialised as JSON.
The agent knows nothing about prefill or decode: it runs `ProcessSpec`s.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["etcd", "mooncake-master", "prefill", "decode", "proxy"]


class Strict(BaseModel):
    """Base for every boundary model: unknown keys are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Probe(Strict):
    """How to tell a process is ready: HTTP GET answering 200, or a TCP connect."""

    kind: Literal["http", "tcp"] = "http"
    host: str = "127.0.0.1"
    port: int
    path: str = "/health"
    period_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)


class RestartPolicy(Strict):
    """Exponential backoff with jitter, reset after a stable period; never a silent give-up.

    `mode`: `always` restarts on any exit, `on-failure` only on a non-zero exit or a signal,
    `never` leaves it exited (reported as such).
    """

    mode: Literal["always", "on-failure", "never"] = "always"
    initial_backoff_s: float = Field(1.0, gt=0)
    max_backoff_s: float = Field(60.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.2, ge=0, le=1)
    reset_after_s: float = Field(60.0, gt=0)


class FileSpec(Strict):
    """A file the agent writes atomically before the process starts (e.g. the Mooncake JSON)."""

    path: str
    content: str
    mode: int = 0o644


class ProcessSpec(Strict):
    """One process an agent must keep running: everything needed to start, probe and stop it."""

    name: str
    role: Role
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    files: list[FileSpec] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int | None = None
    readiness: Probe | None = None
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    stop_signal: Literal["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP"] = "SIGTERM"
    stop_timeout_s: float = Field(30.0, gt=0)
    start_timeout_s: float | None = Field(None, gt=0)  # not ready this long after starting: a problem
    generation: int = 0
    dp_rank: int | None = None
    # Bumped by the coordinator to restart a process that runs the very same thing, e.g. the
    # engines after their Mooncake master restarted and lost its metadata. Part of the hash.
    restart_epoch: int = 0

    def spec_hash(self) -> str:
        """Stable digest of everything that, when changed, requires a restart."""
        payload = self.model_dump(mode="json", exclude={"generation"})
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def endpoint(self) -> str | None:
        return f"{self.host}:{self.port}" if self.port is not None else None


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


class NodeStatus(Strict):
    node: str
    updated_at: float
    processes: list[ProcessStatus] = Field(default_factory=list)
    lease: int = 0  # the member lease of the agent that wrote it

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
