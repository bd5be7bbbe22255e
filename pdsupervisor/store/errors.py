"""What the store raises: `StoreUnavailable` and its family, nothing else."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """etcd is away for now, or would not do what was asked: retry later, touch nothing.

    The store raises only this family, from the transport's own errors (chained as
    `__cause__`), so a caller's `except StoreUnavailable` never swallows an unrelated
    `ConnectionError` or `TimeoutError` of its own (Patroni's `DCSError`).
    """


class EtcdError(StoreUnavailable):
    """etcd answered with an error (e.g. a revision compacted away, a lease not found)."""


class TlsRefused(StoreUnavailable):
    """The TLS handshake with etcd failed: etcd refused our client certificate (none, or not one
    of its CA), or its own is not one our CA bundle trusts. Retrying will not mend it; the
    message says which side refused."""


class TokenRejected(EtcdError):
    """etcd no longer takes our RBAC token (expired, forgotten by a restart): authenticate again."""


class WatchLost(StoreUnavailable):
    """The server ended a watch: read again, then watch from the new revision."""


class RequestTooLarge(EtcdError):
    """etcd refused a request for its size or its number of operations: the same request
    will be refused again (unlike `StoreUnavailable`, nothing to wait out). The message says
    how large it was."""
