"""The proxy's settings (from its command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a long prompt, or a long chat, fits many times over


@dataclass
class ProxyConfig:
    host: str = "0.0.0.0"
    port: int = 8868
    generator_on_p: bool = False
    benchmark_mode: bool = False
    repeat_d_times: int = 0
    api_keys: list[str] = field(default_factory=list)
    connect_timeout_s: float = 10.0  # the seed used 60 s: a black-holed node then hangs requests
    read_timeout_s: float = 1200.0
    total_timeout_s: float = 6 * 3600.0
    probe_interval_s: float = 0.5  # every instance's /health, in rotation or not
    probe_timeout_s: float = 1.0  # a probe unanswered this long is a miss (2 in a row eject)
    pool_size: int = 4096
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger request body is refused (413)
