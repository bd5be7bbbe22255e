"""How the store reaches etcd: TLS with a client certificate, and etcd's RBAC (user, password).

The SSL context is built once per `Store` (files read at start: a key rotated on disk takes
effect at the next start). RBAC follows etcd's gateway: `POST /v3/auth/authenticate` answers
a token, sent in the `Authorization` header of every call; when etcd no longer knows that
token (its TTL passed, etcd restarted) the store authenticates again and retries once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pdsupervisor.core.models import EtcdAccess, TlsFiles


class CredentialsError(ValueError):
    """A credentials file cannot be read or used; the message names it."""


@dataclass(frozen=True)
class Credentials:
    """etcd RBAC: a user and its password (the password is read from a file on the node)."""

    username: str
    password: str = field(repr=False)


def client_ssl_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """Verify etcd against `ca_file` (its name or IP must be in the certificate's SANs) and,
    with `cert_file`/`key_file`, present that client certificate."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load the CA bundle {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise CredentialsError("a client certificate needs both its certificate and its key file")
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"cannot load the client certificate {cert_file} with key {key_file}: {exc}") from None
    return context


def tls_context(tls: TlsFiles | None) -> ssl.SSLContext | None:
    return None if tls is None else client_ssl_context(tls.ca_file, tls.cert_file, tls.key_file)


def files_fingerprint(*paths: str) -> str | None:
    """A short digest of the files' contents (certificates, CA bundles: public material), None
    when one cannot be read. Put into a process's spec, a replaced file restarts the process."""
    digest = hashlib.sha256()
    try:
        for path in paths:
            digest.update(Path(path).read_bytes())
            digest.update(b"\0")
    except OSError:
        return None
    return digest.hexdigest()[:16]


def read_password(path: str) -> str:
    try:
        password = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise CredentialsError(f"cannot read the etcd password file {path}: {exc.strerror or exc}") from None
    if not password:
        raise CredentialsError(f"the etcd password file {path} is empty")
    return password


def credentials(access: EtcdAccess | None) -> tuple[ssl.SSLContext | None, Credentials | None]:
    """The SSL context and RBAC credentials `access` names (files read now)."""
    if access is None:
        return None, None
    auth = None
    if access.username:
        if not access.password_file:
            raise CredentialsError(f"etcd user {access.username} has no password file")
        auth = Credentials(access.username, read_password(access.password_file))
    return tls_context(access.tls), auth


def tls_refusal(exc: BaseException | None) -> str | None:
    """What a failed TLS handshake with etcd means, from `exc` or what caused it; None when
    no TLS error is among them. (aiohttp's wrappers are SSLErrors too, without the details: the
    `ssl` module's own error, their cause, has them.)"""
    for _ in range(16):  # along the chain of causes (bounded: a cycle can be made by hand)
        if exc is None:
            return None
        verify, reason = getattr(exc, "verify_message", None), getattr(exc, "reason", None)
        if isinstance(exc, ssl.SSLCertVerificationError) and verify:
            return f"its certificate is not one the CA bundle trusts (certificate verify failed: {verify})"
        if isinstance(exc, ssl.SSLError) and isinstance(reason, str):
            if "WRONG_VERSION_NUMBER" in reason:
                return f"it does not speak TLS there ({reason})"
            if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
                return f"it refused this client's certificate: none was shown, or not one of its CA ({reason})"
            return f"the TLS handshake failed ({reason})"
        exc = exc.__cause__ or exc.__context__
    return None


# etcd's answers meaning "authenticate again": the token expired or was forgotten (an etcd
# restart forgets simple tokens), none was sent, or the auth store changed since it was issued.
_TOKEN_ERRORS = ("invalid auth token", "user name is empty", "revision of auth store is old")
_UNAUTHENTICATED = 16  # gRPC status code, as the gateway reports it


def token_rejected(status: int, body: bytes) -> bool:
    """Whether an error answer of the gateway asks for a new token."""
    try:
        err = json.loads(body)
    except ValueError:
        return status == 401
    if not isinstance(err, dict):
        return status == 401
    text = f"{err.get('error', '')} {err.get('message', '')}"
    return status == 401 or err.get("code") == _UNAUTHENTICATED or any(t in text for t in _TOKEN_ERRORS)


class TokenAuth:
    """The token of one `Store`'s RBAC session: fetched on first use, fetched again once when
    etcd rejects it (callers that saw the same stale token share one new authentication)."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self._token: str | None = None
        self._lock = asyncio.Lock()

    async def header(self, authenticate: Callable[[Credentials], Awaitable[str]],
                     stale: Mapping[str, str] | None = None) -> dict[str, str]:
        """`{"Authorization": token}`; with `stale` (a header etcd rejected), a newer token."""
        async with self._lock:
            if self._token is None or (stale is not None and stale.get("Authorization") == self._token):
                self._token = None
                self._token = await authenticate(self.creds)
            return {"Authorization": self._token}
