"""Agent configuration: `etc/pdsupervisor/agent.yaml`, overridden by `pd-agent` flags.

One pydantic model; unknown keys are rejected and every error names the offending field,
so a typo in the YAML file fails the start instead of being silently ignored.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pdsupervisor.aio.serve import is_wildcard
from pdsupervisor.core.addresses import is_loopback
from pdsupervisor.core.models import TlsFiles

DEFAULT_PORT = 8470
DEFAULT_CONFIG_PATH = "/etc/pdsupervisor/agent.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EtcdBootstrap(_Strict):
    """The etcd this node's agent runs itself: a one-member etcd, or with `members` one member
    of a several-member cluster (one member per named node: losing one changes nothing)."""

    enabled: bool = False  # with `members` it defaults to: this node is one of them
    # member (node) name -> its host (IP) for peers and clients, ports below: every member's the same.
    # The same list on every node, members or not; empty: a one-member etcd on this node.
    members: dict[str, str] = Field(default_factory=dict)
    # `new`: the members form a cluster together; `existing`: this member was added to a running
    # cluster (`pdsupervisor etcd replace-member`). Only read while the data dir is empty.
    initial_cluster_state: Literal["new", "existing"] = "new"
    data_dir: str | None = None  # default: <state_dir>/etcd
    client_host: str | None = None  # default: the advertise IP
    client_port: int = Field(2379, gt=0, lt=65536)
    peer_port: int = Field(2380, gt=0, lt=65536)
    extra_args: list[str] = Field(default_factory=list)
    # the node's etcd server certificate and key (`pki` nodes/<name>/server.*), with etcd_tls
    cert_file: str | None = None
    key_file: str | None = None

    @field_validator("members")
    @classmethod
    def _members(cls, v: dict[str, str]) -> dict[str, str]:
        for name, host in v.items():
            if not MEMBER_NAME_RE.fullmatch(name):
                raise ValueError(f"member name {name!r}: letters, digits, '.', '_' and '-' only")
            if not host or any(c in host for c in ":/,= "):
                raise ValueError(f"member {name}: {host!r} is not a host name or IPv4 address (ports are "
                                 "bootstrap_etcd.client_port and peer_port)")
        if len(set(v.values())) != len(v):
            raise ValueError("two members on one host: each member needs its own address")
        return v

    @model_validator(mode="after")
    def _state(self) -> EtcdBootstrap:
        if self.initial_cluster_state == "existing" and not self.members:
            raise ValueError("initial_cluster_state existing needs members: the whole member list, this node's new "
                             "member included")
        if self.client_port == self.peer_port:
            raise ValueError("client_port and peer_port are the same")
        return self


MEMBER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class EtcdAuth(_Strict):
    """etcd RBAC (an external etcd with auth enabled): a user whose password is in a file."""

    username: str = Field(min_length=1)
    password_file: str


def read_token_file(path: str) -> tuple[str, int]:
    """The bearer token in `path` (surrounding whitespace removed) and the file's mode.
    ValueError, naming the file, when it cannot be read or holds no token."""
    try:
        text = Path(path).read_text()
        mode = os.stat(path).st_mode & 0o777
    except OSError as exc:
        raise ValueError(f"token_file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"token_file {path}: not text") from None
    token = text.strip()
    if not token:
        raise ValueError(f"token_file {path} is empty: put the token in it "
                         f"(`openssl rand -hex 32 > {path}; chmod 600 {path}`), or leave token_file unset")
    return token, mode


class RestConfig(_Strict):
    """The REST server. Credentials: the bearer token in `token_file` and/or client certificates
    signed by `tls_client_ca`. Without any, the server listens on loopback only."""

    host: str | None = None  # None: 0.0.0.0 with a credential configured, else 127.0.0.1
    port: int = Field(DEFAULT_PORT, ge=0, lt=65536)
    token_file: str | None = None  # bearer token for mutating endpoints and process logs; read once, at load
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # client certificates signed by it are a credential
    _token: str | None = PrivateAttr(None)
    _token_mode: int = PrivateAttr(0)

    @model_validator(mode="after")
    def _credentials(self) -> RestConfig:
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: client certificates are checked by HTTPS")
        if self.token_file:
            self._token, self._token_mode = read_token_file(self.token_file)
        if self.host is not None and not self.credentialed and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} (rest.host / --listen) is not a loopback address, and no credential is "
                "configured: anyone reaching the port could run commands as root on every node. Set "
                "rest.token_file (--token-file) or rest.tls_client_ca, or listen on 127.0.0.1"
            )
        return self

    @property
    def token(self) -> str | None:
        """The bearer token, read from `token_file` when the configuration was loaded."""
        return self._token

    @property
    def credentialed(self) -> bool:
        """A token or a client CA is configured: the API may listen beyond loopback."""
        return bool(self.token_file or self.tls_client_ca)

    def security_warnings(self) -> list[str]:
        """What the agent says at start about how its API is protected (one log line each)."""
        out = []
        if self.token_file and self._token_mode & 0o077:
            out.append(f"token file {self.token_file} is open to group or others (mode {self._token_mode:03o}): "
                       f"run `chmod 600 {self.token_file}`")
        if self.token_file and not self.tls_cert and not is_loopback(self.bind_host):
            out.append(f"the bearer token travels in clear: {self.bind_host} serves plain HTTP; set rest.tls_cert and "
                       "rest.tls_key (e.g. the node's pki server certificate) to serve HTTPS")
        if not self.credentialed:
            out.append(f"no REST credential configured: listening on {self.bind_host} (loopback) only, where any "
                       "local user may change assignments; set rest.token_file (--token-file) to require a token "
                       "(and to listen on other addresses)")
        return out

    @property
    def bind_host(self) -> str:
        """Where the server listens: `host`, or by default 0.0.0.0 with credentials, 127.0.0.1 without."""
        if self.host is not None:
            return self.host
        return "0.0.0.0" if self.credentialed else "127.0.0.1"


class LogConfig(_Strict):
    max_bytes: int = Field(50 * 1024 * 1024, gt=0)  # copy-truncate above this size
    keep: int = Field(3, ge=0)  # rotated copies kept: <name>.log.1 ... .<keep>
    check_interval_s: float = Field(10.0, gt=0)


class AgentConfig(_Strict):
    cluster: str = "default"
    name: str = Field(default_factory=socket.gethostname)
    ip: str | None = None  # advertise IP; default: first non-loopback IPv4
    etcd: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"])
    etcd_tls: TlsFiles | None = None  # the CA bundle, this node's etcd client certificate and key
    etcd_auth: EtcdAuth | None = None
    allow_plaintext_etcd: bool = False  # accept etcd without TLS off loopback (warned at every start)
    bootstrap_etcd: EtcdBootstrap = Field(default_factory=EtcdBootstrap)
    rest: RestConfig = Field(default_factory=RestConfig)
    state_dir: str = "/var/lib/pdsupervisor"
    ttl: int = Field(30, ge=2)
    labels: dict[str, str] = Field(default_factory=dict)
    accelerators: int | None = Field(None, ge=0)  # None: probe /dev
    sys_root: str = "/"  # where probes read /sys, /proc and /dev (tests use a fake tree)
    status_heartbeat_s: float = Field(60.0, gt=0)  # rewrite an unchanged status this rarely
    assignment_resync_s: float = Field(60.0, gt=0)  # re-read the assignment besides the watch
    logs: LogConfig = Field(default_factory=LogConfig)
    # fnmatch globs on argv[0] of what assignments may run here; empty: anything (see README)
    allowed_commands: list[str] = Field(default_factory=list)

    @field_validator("etcd")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one etcd endpoint is needed")
        return v

    @model_validator(mode="after")
    def _etcd_members(self) -> AgentConfig:
        """With `bootstrap_etcd.members`: a member runs here when this node is named (unless
        `enabled` says otherwise), and the endpoints default to every member's client URL."""
        b = self.bootstrap_etcd
        if not b.members:
            return self
        if "enabled" not in b.model_fields_set:
            b.enabled = self.name in b.members
        if b.enabled and self.name not in b.members:
            raise ValueError(f"bootstrap_etcd.members: this node ({self.name}) runs an etcd member "
                             f"(bootstrap_etcd.enabled) but is not in the list ({', '.join(b.members)})")
        if b.enabled and b.client_host is not None and b.client_host != b.members[self.name]:
            raise ValueError(f"bootstrap_etcd.client_host: {b.client_host} but members names {b.members[self.name]} "
                             f"for {self.name}; leave client_host unset")
        if "etcd" not in self.model_fields_set:
            self.etcd = [f"{host}:{b.client_port}" for host in b.members.values()]
        return self

    def etcd_member_warnings(self) -> list[str]:
        """What the agent says at start about its etcd member list (one log line each)."""
        n = len(self.bootstrap_etcd.members)
        if n and n % 2 == 0:
            return [f"bootstrap_etcd.members: {n} members survive {(n - 1) // 2} lost, as {n - 1} do, and need "
                    f"{n // 2 + 1} for a quorum; use {n - 1} or {n + 1}"]
        return []

    @property
    def api_host(self) -> str:
        host = self.rest.bind_host
        return self.ip if is_wildcard(host) and self.ip else host

    def api_url(self, port: int | None = None) -> str:
        """Where other nodes reach this agent's API (`port`: the one actually bound)."""
        scheme = "https" if self.rest.tls_cert else "http"
        return f"{scheme}://{self.api_host}:{port or self.rest.port}"


class ConfigError(ValueError):
    """The configuration is invalid; the message names each offending field."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid agent configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read `path` (may be None: defaults only), apply `overrides` (nested dicts), validate."""
    data: dict[str, Any] = {}
    source = path or "<flags>"
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read agent configuration {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"invalid agent configuration ({path}): top level must be a mapping")
        data = loaded or {}
    data = _merge(data, overrides or {})
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    from agent.etcd_security import check_etcd_security  # it reads this module's models

    check_etcd_security(config, source)
    return config


def parse_listen(value: str) -> tuple[str | None, int]:
    """`host:port`, `:port` or `port` -> (host, port); no host: None, the default (see `RestConfig.bind_host`)."""
    host, _, port = value.rpartition(":")
    return (host or None), int(port)
