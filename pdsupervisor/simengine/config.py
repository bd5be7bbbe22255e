"""Parse a vLLM-style command line plus the environment into a `SimConfig`.

vLLM has hundreds of flags; the simulator keeps the few that matter to PD serving and
ignores the rest (with a warning) so the spec's vLLM argv templates run with only the
executable swapped. An unknown `--flag` takes the next token as its value unless that
token is itself a flag, which covers both `--flag value` and bare `--flag` forms.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DP_ENV_VARS = (
    "VLLM_DP_SIZE",
    "VLLM_DP_RANK",
    "VLLM_DP_RANK_LOCAL",
    "VLLM_DP_MASTER_IP",
    "VLLM_DP_MASTER_PORT",
    "VLLM_EP_SIZE",
)
# vLLM's defaults for the upstream flags (ParallelConfig.data_parallel_master_ip / _rpc_port).
DP_DEFAULT_ADDRESS = "127.0.0.1"
DP_DEFAULT_RPC_PORT = 29550


class ConfigError(ValueError):
    """A command line the simulator cannot run with (bad value, unreadable Mooncake JSON)."""


@dataclass(frozen=True)
class DPSettings:
    """This engine's place in a data-parallel group of more than one rank (see dpgroup.py)."""

    size: int
    rank: int
    master_ip: str
    master_port: int
    source: str  # "flags" (--data-parallel-*) or "env" (VLLM_DP_*)

    @property
    def master(self) -> str:
        return f"{self.master_ip}:{self.master_port}"


@dataclass
class SimConfig:
    argv: list[str]
    model: str = "sim-model"
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    tensor_parallel_size: int = 1
    kv_transfer_config: dict[str, Any] | None = None
    load_time_s: float = 0.0
    ttft_per_token_s: float = 0.0
    tpot_s: float = 0.0
    max_batch: int = 256
    natural_len: int = 16
    prefix_cache_blocks: int = 4096  # blocks of prefixcache.BLOCK_TOKENS tokens; 0: no prefix cache
    dp_env: dict[str, str] = field(default_factory=dict)
    # Upstream vLLM's DP flags as given (None: absent); `dp` is what the engine uses.
    dp_size: int | None = None
    dp_rank: int | None = None
    dp_start_rank: int | None = None
    dp_size_local: int | None = None  # accepted, not used: one simulator process is one rank
    dp_address: str | None = None
    dp_rpc_port: int | None = None
    dp: DPSettings | None = None
    mooncake_config_path: str | None = None
    mooncake_config: dict[str, Any] | None = None
    # Real KV hand-off (off by default): "none" or "mooncake" (see kvstore.py).
    kv_transfer: str = "none"
    kv_bytes_per_token: int = 4096  # KV bytes a prefill writes per prompt token...
    kv_max_bytes: int = 1 << 20  # ...capped at this (keep it <= the local buffer)
    kv_timeout_s: float = 10.0  # a put/get slower than this is a failed request
    # Caps applied to the Mooncake JSON's sizes (the JSON file itself is never edited):
    # the store allocates its whole global segment at start-up, so the production
    # default (50 GiB) does not fit a test machine. 0 = no cap.
    mooncake_segment_cap: int = 0
    mooncake_buffer_cap: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def kv_role(self) -> str | None:
        return (self.kv_transfer_config or {}).get("kv_role")

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def debug_view(self) -> dict[str, Any]:
        return {
            "argv": self.argv,
            "model": self.model,
            "served_model_name": self.served_model_name,
            "host": self.host,
            "port": self.port,
            "tp": self.tensor_parallel_size,
            "kv_transfer_config": self.kv_transfer_config,
            "kv_role": self.kv_role,
            "dp_env": self.dp_env,
            "dp": None if self.dp is None else {
                "size": self.dp.size, "rank": self.dp.rank, "master": self.dp.master, "source": self.dp.source},
            "mooncake_config_path": self.mooncake_config_path,
            "mooncake_config": self.mooncake_config,
            "ignored_flags": self.ignored,
            "sim": {
                "load_time_s": self.load_time_s,
                "ttft_per_token_s": self.ttft_per_token_s,
                "tpot_s": self.tpot_s,
                "max_batch": self.max_batch,
                "natural_len": self.natural_len,
                "prefix_cache_blocks": self.prefix_cache_blocks,
                "kv_transfer": self.kv_transfer,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_max_bytes": self.kv_max_bytes,
                "kv_timeout_s": self.kv_timeout_s,
                "mooncake_segment_cap": self.mooncake_segment_cap,
                "mooncake_buffer_cap": self.mooncake_buffer_cap,
            },
        }


def parse_size(value: str | int) -> int:
    """Bytes from `65536`, `64k`, `64MiB`, `1g` (binary units, as Mooncake's own parser)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# flag -> (attribute, converter); aliases share an entry.
_VALUE_FLAGS: dict[str, tuple[str, Any]] = {
    "--model": ("model", str),
    "--served-model-name": ("served_model_name", str),
    "--host": ("host", str),
    "--port": ("port", int),
    "-tp": ("tensor_parallel_size", int),
    "--tensor-parallel-size": ("tensor_parallel_size", int),
    "--kv-transfer-config": ("kv_transfer_config", json.loads),
    "--sim-load-time": ("load_time_s", float),
    "--sim-ttft-per-token": ("ttft_per_token_s", float),
    "--sim-tpot": ("tpot_s", float),
    "--sim-max-batch": ("max_batch", int),
    "--sim-natural-len": ("natural_len", int),
    "--sim-prefix-cache-blocks": ("prefix_cache_blocks", int),
    "--sim-kv-transfer": ("kv_transfer", str),
    "--sim-kv-bytes-per-token": ("kv_bytes_per_token", parse_size),
    "--sim-kv-max-bytes": ("kv_max_bytes", parse_size),
    "--sim-kv-timeout": ("kv_timeout_s", float),
    "--sim-mooncake-segment-cap": ("mooncake_segment_cap", parse_size),
    "--sim-mooncake-buffer-cap": ("mooncake_buffer_cap", parse_size),
    "--data-parallel-size": ("dp_size", int),
    "-dp": ("dp_size", int),
    "--data-parallel-rank": ("dp_rank", int),
    "-dpn": ("dp_rank", int),
    "--data-parallel-start-rank": ("dp_start_rank", int),
    "-dpr": ("dp_start_rank", int),
    "--data-parallel-size-local": ("dp_size_local", int),
    "-dpl": ("dp_size_local", int),
    "--data-parallel-address": ("dp_address", str),
    "-dpa": ("dp_address", str),
    "--data-parallel-rpc-port": ("dp_rpc_port", int),
    "-dpp": ("dp_rpc_port", int),
}

KV_TRANSFER_MODES = ("none", "mooncake")


def sim_env_var(flag: str) -> str:
    """`--sim-max-batch` -> `PDSIM_MAX_BATCH`: the environment variable of a simulator flag."""
    return "PDSIM_" + flag.removeprefix("--sim-").replace("-", "_").upper()


# Every simulator knob (`--sim-*`) may also come from the environment (flags win).
_SIM_ENV: dict[str, str] = {sim_env_var(flag): flag for flag in _VALUE_FLAGS if flag.startswith("--sim-")}

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _canonical(flag: str) -> str:
    """vLLM accepts `--tensor_parallel_size` as well as `--tensor-parallel-size`."""
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SimConfig:
    env = os.environ if env is None else env
    cfg = SimConfig(argv=list(argv))
    values: dict[str, str] = {}
    for var, flag in _SIM_ENV.items():
        if env.get(var):
            values[flag] = env[var]

    args = list(argv)
    if args and args[0] == "serve":  # `vllm serve MODEL ...`
        args = args[1:]
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("-"):
            if "--model" not in values:  # positional model, as in `vllm serve MODEL`
                values["--model"] = tok
            else:
                cfg.ignored.append(tok)
            i += 1
            continue
        name, eq, inline = tok.partition("=")
        name = _canonical(name)
        if name in _VALUE_FLAGS:
            if eq:
                values[name] = inline
                i += 1
            elif i + 1 < len(args):
                values[name] = args[i + 1]
                i += 2
            else:
                raise ConfigError(f"{tok} needs a value")
            continue
        # Unknown flag: swallow its value if it has one.
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
            cfg.ignored.extend([tok, args[i + 1]])
            i += 2
        else:
            cfg.ignored.append(tok)
            i += 1

    for flag, raw in values.items():
        attr, conv = _VALUE_FLAGS[flag]
        try:
            setattr(cfg, attr, conv(raw))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad value for {flag}: {raw!r} ({exc})") from exc
    if cfg.kv_transfer_config is not None and not isinstance(cfg.kv_transfer_config, dict):
        raise ConfigError("--kv-transfer-config must be a JSON object")
    if cfg.max_batch < 1:
        raise ConfigError("--sim-max-batch must be >= 1")
    if cfg.prefix_cache_blocks < 0:
        raise ConfigError("--sim-prefix-cache-blocks must be >= 0 (0: no prefix cache)")
    if cfg.kv_transfer not in KV_TRANSFER_MODES:
        raise ConfigError(f"--sim-kv-transfer must be one of {', '.join(KV_TRANSFER_MODES)}")
    if cfg.kv_timeout_s <= 0:
        raise ConfigError("--sim-kv-timeout must be > 0")
    if cfg.kv_bytes_per_token < 1 or cfg.kv_max_bytes < 1:
        raise ConfigError("--sim-kv-bytes-per-token and --sim-kv-max-bytes must be >= 1")

    cfg.dp_env = {k: env[k] for k in DP_ENV_VARS if k in env}
    cfg.dp = _dp_settings(cfg, env)
    path = env.get("MOONCAKE_CONFIG_PATH")
    if path:
        cfg.mooncake_config_path = path
        try:
            with open(path, encoding="utf-8") as f:
                cfg.mooncake_config = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"MOONCAKE_CONFIG_PATH={path}: {exc}") from exc
    if cfg.kv_transfer == "mooncake" and not isinstance(cfg.mooncake_config, dict):
        raise ConfigError("--sim-kv-transfer mooncake needs MOONCAKE_CONFIG_PATH (a Mooncake JSON object)")
    return cfg


def _dp_settings(cfg: SimConfig, env: Mapping[str, str]) -> DPSettings | None:
    """The DP group this engine is a rank of; None for DP size 1 (no group).

    As vLLM's ParallelConfig: `--data-parallel-size` > 1 takes every DP setting from the
    flags (rank: `--data-parallel-rank`, else `--data-parallel-start-rank`, else 0), otherwise
    they all come from VLLM_DP_* (the Gaudi fork's way): the two are never mixed.
    """
    if cfg.dp_size is not None and cfg.dp_size > 1:
        rank = cfg.dp_rank if cfg.dp_rank is not None else cfg.dp_start_rank or 0
        port = DP_DEFAULT_RPC_PORT if cfg.dp_rpc_port is None else cfg.dp_rpc_port
        dp = DPSettings(cfg.dp_size, rank, cfg.dp_address or DP_DEFAULT_ADDRESS, port, "flags")
        names = ("--data-parallel-rank", "--data-parallel-rpc-port")
    else:
        try:
            size, rank, port = (int(env.get(var) or default) for var, default in (
                ("VLLM_DP_SIZE", "1"), ("VLLM_DP_RANK", "0"), ("VLLM_DP_MASTER_PORT", "0")))
        except ValueError as exc:
            raise ConfigError(f"bad VLLM_DP_* value: {exc}") from exc
        dp = DPSettings(size, rank, env.get("VLLM_DP_MASTER_IP") or DP_DEFAULT_ADDRESS, port, "env")
        names = ("VLLM_DP_RANK", "VLLM_DP_MASTER_PORT")
    if dp.size <= 1:
        return None
    if not 0 <= dp.rank < dp.size:
        raise ConfigError(f"{names[0]}: DP rank {dp.rank} is not in 0..{dp.size - 1}")
    if not 0 < dp.master_port < 65536:
        raise ConfigError(f"{names[1]}: DP size {dp.size} needs the DP master port (got {dp.master_port})")
    return dp
