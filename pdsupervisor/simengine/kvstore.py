"""A real KV hand-off through Mooncake Store, for `--sim-kv-transfer mooncake`.

The simulated engine reads the Mooncake JSON at `MOONCAKE_CONFIG_PATH` as the agent wrote
it and connects a `MooncakeDistributedStore` with it (metadata server, master, protocol,
device, segment sizes), so a cluster run proves the JSON works with the real library.
A prefill engine `put`s deterministic bytes per request and names them in its
`kv_transfer_params` (`mooncake_key`, `kv_bytes`, `kv_sha256`); a decode engine `get`s
them and checks length and sha256. Every call here blocks (C++): callers use a thread.

What the real store needs from the JSON (learned against mooncake-transfer-engine 0.3.13):
- the JSON's names are vLLM's (`device_name`, `master_server_address`); the store's
  dict-form `setup` calls them `rdma_devices` and `master_server_addr`, so they are passed
  positionally here;
- `global_segment_size` is mapped (address space, not resident memory) and registered at
  start-up and must be at least 16 MiB; 0 is refused; a segment larger than RAM + swap fails
  under the kernel's default overcommit (the production default, 50 GiB, on a small machine);
- `local_buffer_size` bounds the largest single value: a `put` bigger than it fails;
- a `put` may land in any engine's mounted segment, including one of an engine that died
  and whose lease the master has not yet expired; puts here prefer this engine's own
  segment (a prefill's KV lives in its own memory), so only the prefill's death loses KV,
  and a decode then reads 0 bytes at once (verification fails: a 500, never a hang);
- with `protocol: tcp` the transfer engine advertises the first active interface's IP,
  not `local_hostname`, unless `MC_TCP_BIND_ADDRESS` is set in the engine's environment;
- `put`/`get` release the GIL but wait ~30 s on an unreachable master: the engine bounds
  them (`--sim-kv-timeout`);
- `close` holds the GIL and retries a gone master/etcd for ~25 s, and was seen to crash the
  process (SIGSEGV) after a frozen master: a stopping engine does not call it (see
  `server.serve`); the master drops a gone client's segment after its client TTL.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pdsupervisor.simengine.config import SimConfig

log = logging.getLogger("pdsupervisor.simengine.kv")

MIN_SEGMENT = 16 << 20  # the store refuses a smaller global segment
DEFAULT_SEGMENT = 3355443200  # Mooncake's own defaults when the JSON omits them
DEFAULT_BUFFER = 1073741824


class KVError(RuntimeError):
    """The store could not be set up, or a hand-off failed."""


def kv_payload(seed: str, size: int) -> bytes:
    """`size` deterministic bytes for one request (same seed, same bytes)."""
    return hashlib.shake_256(seed.encode()).digest(size)


@dataclass
class MooncakeKV:
    cfg: SimConfig
    store: Any = None
    segment: str = ""  # this engine's segment name at the master (`host:port`)
    placement: Any = None  # the puts' ReplicateConfig: this engine's own segment preferred
    params: dict[str, Any] = field(default_factory=dict)
    setup_s: float | None = None
    last_put: dict[str, Any] | None = None
    last_get: dict[str, Any] | None = None

    def setup_args(self) -> dict[str, Any]:
        """The JSON's fields as the store takes them, with the sim engine's size caps applied."""
        mc = self.cfg.mooncake_config or {}
        missing = [k for k in ("local_hostname", "metadata_server", "master_server_address") if not mc.get(k)]
        if missing:
            raise KVError(f"Mooncake JSON {self.cfg.mooncake_config_path} lacks {', '.join(missing)}")
        segment = int(mc.get("global_segment_size", DEFAULT_SEGMENT))
        buffer = int(mc.get("local_buffer_size", DEFAULT_BUFFER))
        if self.cfg.mooncake_segment_cap:
            segment = min(segment, self.cfg.mooncake_segment_cap)
        if self.cfg.mooncake_buffer_cap:
            buffer = min(buffer, self.cfg.mooncake_buffer_cap)
        if segment < MIN_SEGMENT:
            raise KVError(f"global_segment_size {segment} is below Mooncake's minimum of {MIN_SEGMENT} bytes")
        if buffer < self.cfg.kv_max_bytes:
            raise KVError(f"local_buffer_size {buffer} is smaller than --sim-kv-max-bytes {self.cfg.kv_max_bytes}:"
                          " every put that large would fail")
        return {
            "local_hostname": str(mc["local_hostname"]),
            "metadata_server": str(mc["metadata_server"]),
            "global_segment_size": segment,
            "local_buffer_size": buffer,
            "protocol": str(mc.get("protocol") or "tcp"),
            "device_name": str(mc.get("device_name") or ""),
            "master_server_address": str(mc["master_server_address"]),
        }

    def setup(self) -> None:
        self.params = self.setup_args()
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as exc:
            raise KVError(f"--sim-kv-transfer mooncake needs the mooncake package: {exc}") from exc
        p = self.params
        t0 = time.monotonic()
        store = MooncakeDistributedStore()
        rc = store.setup(p["local_hostname"], p["metadata_server"], p["global_segment_size"], p["local_buffer_size"],
                         p["protocol"], p["device_name"], p["master_server_address"])
        self.setup_s = round(time.monotonic() - t0, 3)
        if rc != 0:
            # A half set-up client can still answer, so a non-zero code is fatal here.
            try:
                store.close()
            except Exception:
                pass
            raise KVError(f"MooncakeDistributedStore.setup returned {rc} with {p} (see the engine's stderr)")
        self.store = store
        self.segment = store.get_hostname()
        self.placement = ReplicateConfig()
        self.placement.preferred_segment = self.segment
        log.info("mooncake store ready in %.3fs: %s", self.setup_s, p)

    def size_for(self, prompt_tokens: int) -> int:
        return max(1, min(self.cfg.kv_max_bytes, self.cfg.kv_bytes_per_token * max(1, prompt_tokens)))

    def put(self, key: str, seed: str, size: int) -> dict[str, Any]:
        """Write the request's KV; the answer goes into `kv_transfer_params`."""
        data = kv_payload(seed, size)
        digest = hashlib.sha256(data).hexdigest()
        rc = self.store.put(key, data, self.placement)
        self.last_put = {"key": key, "bytes": size, "sha256": digest, "rc": rc, "segment": self.segment}
        if rc != 0:
            raise KVError(f"mooncake put {key} ({size} bytes) returned {rc}")
        return {"mooncake_key": key, "kv_bytes": size, "kv_sha256": digest}

    def get_verified(self, key: str, size: Any, digest: Any) -> dict[str, Any]:
        """Read the KV a prefill wrote and check it; KVError when it is missing or differs."""
        data = self.store.get(key)
        got = hashlib.sha256(data).hexdigest()
        ok = len(data) == size and got == digest
        self.last_get = {"key": key, "bytes_read": len(data), "bytes_expected": size, "sha256": got,
                         "sha256_expected": digest, "sha256_ok": ok}
        if not ok:
            raise KVError(f"mooncake get {key}: read {len(data)} bytes (sha256 {got[:12]}), "
                          f"expected {size} bytes (sha256 {str(digest)[:12]})")
        return self.last_get

    def debug_view(self) -> dict[str, Any]:
        return {"mode": "mooncake", "ready": self.store is not None, "config_path": self.cfg.mooncake_config_path,
                "setup_params": self.params, "segment": self.segment, "setup_s": self.setup_s, "last_put": self.last_put,
                "last_get": self.last_get}
