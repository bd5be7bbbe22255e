"""The bounds every spec and assignment value is held to (README: "Limits").

Sane maxima, so that a typo or a hostile document is refused naming its field instead of
exhausting etcd, the planner or an agent: huge counts, endless strings, durations no timer
can hold. Floats must be finite (`models.Strict`: no NaN, no infinity).
"""

from __future__ import annotations

MAX_DURATION_S = 7 * 24 * 3600.0  # every timeout, period and backoff: a week at most
LEASE_TTL_MIN_S = 2  # etcd raises a shorter lease TTL to 2 s (its election timeout x 1.5, rounded up)
LEASE_TTL_MAX_S = 300  # a node away longer than this is lost: five minutes
MAX_NODES = 1024  # per role, and spare nodes
MAX_SLOTS = 256  # accelerators per node; so at most 256 engines per node, and TP at most 256
MAX_ARGS = 512  # items of an argv template or argument list
MAX_ENV = 256  # variables of one env mapping
MAX_LABELS = 64
MAX_MASTERS = 9  # Mooncake masters (replicas), and endpoints of their etcd
MAX_ENDPOINTS = 16
MAX_STRING = 16 * 1024  # characters of any string of the spec (an inline chat template fits)
MAX_PATH = 4096  # characters of a path (PATH_MAX)
MAX_THREADS = 4096
MAX_BYTES_SIZE = 1 << 50  # a Mooncake segment or buffer: 1 PiB
MAX_BATCH = 1 << 20  # benchmark.decode_batch_size
MAX_HUGEPAGES = 1 << 31

# etcd refuses a request over its --max-request-bytes (1.5 MiB by default); the coordinator
# writes in bounded transactions, one key at least (`Store.write_as_leader`). A spec that would
# make one node's assignment, or the spec record, larger than MAX_WRITE_BYTES is refused when
# submitted; the margin is for what the trial plan cannot know (the real nodes' IPs, state dirs
# and interpreter paths), and a value this large still passes etcd's gateway (2 MiB a message)
# base64-encoded.
ETCD_MAX_REQUEST_BYTES = 1536 * 1024
MAX_WRITE_BYTES = 1024 * 1024
