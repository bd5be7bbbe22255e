"""Agent configuration: `etc/pdsupervisor/agent.yaml`, overridden by `pd-agent` flags.

One pydantic model; unknown keys are rejected and every error names the offending field,
so a typo in the YAML file fails the start instead of being silently ignored.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pdsupervisor.aio.serve import is_wildcard
from pdsupervisor.core.models import TlsFiles

DEFAULT_PORT = 8470
DEFAULT_CONFIG_PATH = "/etc/pdsupervisor/agent.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EtcdBootstrap(_Strict):
    """This node starts a one-member etcd itself, before it registers."""

    enabled: bool = False
    data_dir: str | None = None  # default: <state_dir>/etcd
    client_host: str | None = None  # default: the advertise IP
    client_port: int = Field(2379, gt=0, lt=65536)
    peer_port: int = Field(2380, gt=0, lt=65536)
    extra_args: list[str] = Field(default_factory=list)
    # the node's etcd server certificate and key (`pki` nodes/<name>/server.*), with etcd_tls
    cert_file: str | None = None
    key_file: str | None = None


class EtcdAuth(_Strict):
    """etcd RBAC (an external etcd with auth enabled): a user whose password is in a file."""

    username: str = Field(min_length=1)
    password_file: str


class RestConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(DEFAULT_PORT, ge=0, lt=65536)
    token_file: str | None = None  # bearer token for mutating endpoints
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # when set, clients must present a certificate

    @property
    def token(self) -> str | None:
        if not self.token_file:
            return None
        return Path(self.token_file).read_text().strip() or None


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

    @field_validator("etcd")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one etcd endpoint is needed")
        return v

    @property
    def api_host(self) -> str:
        return self.ip if is_wildcard(self.rest.host) and self.ip else self.rest.host

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
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
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


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port`, `:port` or `port` -> (host, port)."""
    host, _, port = value.rpartition(":")
    return (host or "0.0.0.0"), int(port)
