"""Who may do what on the agent's REST API (Patroni's shape): open reads, guarded writes.

Reads that reveal nothing sensitive are open (`/healthz`, `/readyz`, `/status`, `/metrics`,
`/cluster`, `/nodes`, `/events`, `/openapi.yaml`). A request **needs a credential** when it mutates (POST, PUT,
PATCH, DELETE: `guard`, for the whole app) or shows process output (`/logs/...`: handlers
decorated with `require_credential`). A credential is

- the bearer token of `rest.token_file`: `Authorization: Bearer <token>`, the scheme in any
  case, compared with `hmac.compare_digest`; or
- a client certificate signed by `rest.tls_client_ca`, verified in the TLS handshake. With a
  token configured as well, the handshake asks for a certificate but does not insist
  (CERT_OPTIONAL): clients without one still read, and write with the token; a certificate
  that is presented must verify, or the handshake fails. With the client CA as the only
  credential, every client must present a certificate (CERT_REQUIRED), readers too.

With no credential configured the server listens on loopback only (`RestConfig.bind_host`)
and serves such requests only when the `Host` header names a loopback address, so a web page
that rebinds its DNS name to 127.0.0.1 cannot use them. Any local user can, though: configure
a token on a shared machine.

Every request needing a credential is also refused (403) when it carries an `Origin` other than
the agent's own: browsers add it to cross-site requests, which is how a web page would reach an
agent. A mutating request's body is JSON or YAML (`BODY_TYPES`, else 415) of at most
`MAX_BODY` bytes (else 413); a POST without a body (`/cluster/stop`) may carry any type or none.

`request[CALLER]` names who was let in ("token", "cert:<subject CN>", or "local" without
credentials); `audit` records what an accepted mutating request did as a `kind="audit"` event.
"""

from __future__ import annotations

import functools
import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from agent.api.errors import MAX_BODY, error_body, json_error
from agent.config import AgentConfig, RestConfig
from pdsupervisor.aio.serve import is_wildcard
from pdsupervisor.core.addresses import is_loopback
from pdsupervisor.store.etcd import Store, StoreUnavailable

log = structlog.get_logger("agent.api")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml")
LOCAL_CALLER = "local"  # no credential configured: loopback only

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AccessPolicy:
    """What the app checks: the token, whether client certificates count, the agent's own hosts."""

    token: str | None
    client_certs: bool
    hosts: frozenset[str]  # names and addresses that are this agent (for `Origin`)

    @classmethod
    def from_config(cls, config: AgentConfig) -> AccessPolicy:
        rc = config.rest
        hosts = {h for h in (config.ip, rc.bind_host) if h and not is_wildcard(h)}
        return cls(token=rc.token, client_certs=bool(rc.tls_client_ca and rc.tls_cert), hosts=frozenset(hosts))

    @property
    def configured(self) -> bool:
        return bool(self.token) or self.client_certs


POLICY: web.AppKey[AccessPolicy] = web.AppKey("access_policy", AccessPolicy)
CALLER: web.RequestKey[str] = web.RequestKey("caller", str)


def ssl_context(rc: RestConfig) -> ssl.SSLContext | None:
    """The HTTPS server's context; client certificates as the module docstring says."""
    if not rc.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(rc.tls_cert, rc.tls_key)
    if rc.tls_client_ca:
        ctx.load_verify_locations(rc.tls_client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL if rc.token else ssl.CERT_REQUIRED
    return ctx


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme in any case), else None."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _subject_cn(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"


def identify(request: web.Request, policy: AccessPolicy) -> str | None:
    """Who the request proves to be: "token", "cert:<CN>" (a verified client certificate), or None."""
    given = bearer(request)
    if policy.token and given is not None and hmac.compare_digest(given.encode(), policy.token.encode()):
        return "token"
    transport = request.transport
    cert = transport.get_extra_info("peercert") if policy.client_certs and transport is not None else None
    if cert:  # only a certificate that verified against the client CA gets past the handshake
        return f"cert:{_subject_cn(cert)}"
    return None


def _origins(request: web.Request, policy: AccessPolicy) -> set[str]:
    """The agent's own origins as a browser would write them, from the socket the request came in
    on and the configured addresses; never from the request's own `Host` header."""
    transport = request.transport
    sock = transport.get_extra_info("sockname") if transport is not None else None
    if not sock:
        return set()
    ip, port = str(sock[0]), int(sock[1])
    scheme = "https" if transport is not None and transport.get_extra_info("sslcontext") else "http"
    hosts = {ip, *policy.hosts}
    if is_loopback(ip):
        hosts |= {"localhost", "127.0.0.1", "::1"}
    names = {f"[{h}]" if ":" in h else h for h in hosts}
    out = {f"{scheme}://{n}:{port}".lower() for n in names}
    if (scheme, port) in (("http", 80), ("https", 443)):
        out |= {f"{scheme}://{n}".lower() for n in names}
    return out


def authorize(request: web.Request) -> str:
    """The caller of a request that needs a credential; raises 401 or 403 (JSON) otherwise."""
    policy = request.app[POLICY]
    if policy.configured:
        caller = identify(request, policy)
        if caller is None:
            log.warning("rest request refused: no valid credential", method=request.method, path=request.path,
                        remote=request.remote)
            what = "bearer token" + (" or client certificate" if policy.client_certs else "")
            raise json_error(web.HTTPUnauthorized, f"missing or wrong {what}", "Authorization",
                             headers={"WWW-Authenticate": "Bearer"})
    else:
        host = urlsplit("//" + request.host).hostname or ""
        if not is_loopback(host):
            raise json_error(web.HTTPForbidden, f"Host {request.host!r} is not a loopback address; without "
                             "credentials configured this agent serves this only on loopback", "Host")
        caller = LOCAL_CALLER
    origin = request.headers.get("Origin")
    if origin is not None and origin.strip().lower() not in _origins(request, policy):
        log.warning("rest request refused: foreign Origin", origin=origin, method=request.method,
                    path=request.path, remote=request.remote)
        raise json_error(web.HTTPForbidden, f"cross-origin request refused (Origin {origin!r})", "Origin")
    request[CALLER] = caller
    return caller


def check_body(request: web.Request) -> None:
    """A mutating request's body: JSON or YAML, at most MAX_BODY bytes. Without a body the type
    does not matter (aiohttp's client sends an empty POST as application/octet-stream)."""
    if not request.body_exists:
        return
    if request.content_type not in BODY_TYPES or not request.headers.get("Content-Type", "").strip():
        declared = request.headers.get("Content-Type", "").strip()
        what = f"Content-Type {declared}" if declared else "a body without a Content-Type"
        raise json_error(web.HTTPUnsupportedMediaType,
                         f"{what} is not accepted: send one of {', '.join(BODY_TYPES)}", "Content-Type")
    size = request.content_length
    if size is not None and size > MAX_BODY:  # refused before reading; a chunked body stops at the limit
        raise web.HTTPRequestEntityTooLarge(MAX_BODY, size, content_type="application/json",
                                            text=error_body(f"body of {size} bytes is larger than {MAX_BODY}", "body"))


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every mutating request: a credential, no foreign Origin, a JSON or YAML body."""
    if request.method in MUTATING:
        authorize(request)
        check_body(request)
    return await handler(request)


def require_credential(handler: Handler) -> Handler:
    """Decorator for a read that shows what must not be open (process output): as `guard` does
    for writes, minus the body check."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        authorize(request)
        return await handler(request)

    return wrapped



async def audit(request: web.Request, store: Store, did: str, **fields: Any) -> None:
    """Record an accepted mutating request: who (`request[CALLER]`), from where, what it did.

    In the agent's log always; in etcd as a `kind="audit"` event when etcd answers (the request
    has done its work by now: a failed audit write is logged, not turned into an error)."""
    caller = request.get(CALLER, "unknown")
    message = f"{request.method} {request.path} by {caller} from {request.remote}: {did}"
    record = {"caller": caller, "remote": request.remote, "method": request.method, "path": request.path, **fields}
    log.info("audit", message=message, **record)
    try:
        await store.append_event("audit", message, **record)
    except StoreUnavailable as exc:
        log.error("audit event not written to etcd", error=str(exc), message=message)
