"""A small HTTP client for an agent's REST API (what the CLI and the demo talk through).

Answers come back as the document models the routes serialize (`pdsupervisor.core.documents`).

The bearer token goes only where it is needed and only where it is safe: on mutating requests
and process logs (open reads never carry it), to the API URL the client was given. For another
agent's URL read from etcd (a node's `api_url`, for its logs: `at`) it goes only when that URL
is the given one, a loopback address, or https verified against the cluster CA (`ca_file`):
never over plain http to an address anyone able to write to etcd could have put there.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import ValidationError

from pdsupervisor.core.addresses import is_loopback
from pdsupervisor.core.documents import ClusterDocument, ErrorBody, Event, EventsDocument, NodesDocument, SubmitAnswer
from pdsupervisor.core.etcd_members import EtcdDocument, MemberReplaced, ReplaceRequest

DEFAULT_API_PORT = 8470  # an agent's REST port unless configured
DEFAULT_API = f"http://127.0.0.1:{DEFAULT_API_PORT}"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
D = TypeVar("D", ClusterDocument, EventsDocument, NodesDocument, SubmitAnswer, EtcdDocument, MemberReplaced)


class ApiError(Exception):
    """A non-2xx answer: `body` as received; `error`, the agent's error document (None when
    something else answered, e.g. a proxy in between)."""

    def __init__(self, status: int, body: Any, withheld: str | None = None):
        self.status = status
        self.body = body
        self.withheld = withheld  # why the client did not send its token here (a 401 then says so)
        self.error = _error_body(body)
        message = self.error.error if self.error else body
        problems = (self.error.problems if self.error else None) or []
        lines = [f"HTTP {status}: {message}"] + [f"  {p.field}: {p.message}" for p in problems]
        if withheld and status == 401:
            lines.append(f"  (the token was not sent: {withheld})")
        super().__init__("\n".join(lines))


def _error_body(body: Any) -> ErrorBody | None:
    try:
        return ErrorBody.model_validate(body)
    except ValidationError:
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlsplit(url)
    default = {"http": 80, "https": 443}.get(u.scheme)
    return u.scheme, (u.hostname or "").lower(), u.port or default


@dataclass
class ApiClient:
    base_url: str = DEFAULT_API
    token: str | None = None
    ca_file: str | None = None  # the cluster CA: https answers are verified against it alone
    timeout_s: float = 10.0
    cert_file: str | None = None  # client certificate, for an agent that requires one
    key_file: str | None = None
    withheld: str | None = None  # set by `at` when the token must not go to this URL

    def _ssl(self) -> ssl.SSLContext | bool:
        if not (self.ca_file or self.cert_file):
            return True
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _session(self, auth: bool = False) -> aiohttp.ClientSession:
        """A session; with `auth`, it sends the token (if the client has one it may send here)."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token and not self.withheld else {}
        ssl_ctx = self._ssl()
        return aiohttp.ClientSession(
            base_url=self.base_url.rstrip("/") + "/", headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx),
        )

    def token_safe_for(self, url: str) -> str | None:
        """None when the token may go to `url`; else why not."""
        scheme, host, _ = _origin(url)
        if _origin(url) == _origin(self.base_url) or is_loopback(host):
            return None
        if scheme == "https" and self.ca_file:
            return None  # verified against the cluster CA only (see `_ssl`)
        if scheme == "https":
            return f"{url} is https, but without --ca-file (the cluster CA) it is not known to be an agent"
        return f"{url} (read from etcd) is plain http; serve the agents' API over https and pass --ca-file"

    def at(self, url: str) -> ApiClient:
        """A client for another agent at `url` read from etcd: the same credentials, but the token
        only when `token_safe_for(url)`."""
        return dataclasses.replace(self, base_url=url, withheld=self.token_safe_for(url) if self.token else None)

    async def _answer(self, method: str, path: str, auth: bool | None = None, **kw: Any) -> tuple[int, Any]:
        auth = method.upper() in MUTATING if auth is None else auth
        async with self._session(auth) as session, session.request(method, path.lstrip("/"), **kw) as resp:
            body = await _body(resp)
            if resp.status >= 400:
                raise ApiError(resp.status, body, self.withheld)
            return resp.status, body

    async def request(self, method: str, path: str, auth: bool | None = None, **kw: Any) -> Any:
        """The answer's JSON (or text); ApiError on a non-2xx answer. The token goes with
        mutating methods, or as `auth` says."""
        return (await self._answer(method, path, auth, **kw))[1]

    async def document(self, model: type[D], method: str, path: str, **kw: Any) -> D:
        """The answer as `model`; ApiError, saying so, when it is not one (e.g. a proxy answered)."""
        status, body = await self._answer(method, path, **kw)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the answer"
            raise ApiError(status, f"not a {model.__name__} document ({where}: {first['msg']})") from None

    async def cluster(self) -> ClusterDocument:
        return await self.document(ClusterDocument, "GET", "/cluster")

    async def start(self, spec_text: str, replace: bool = False) -> SubmitAnswer:
        params = {"replace": "true"} if replace else {}
        return await self.document(SubmitAnswer, "POST", "/cluster/start", data=spec_text.encode(), params=params,
                                   headers={"Content-Type": "application/yaml"})

    async def stop(self) -> SubmitAnswer:
        return await self.document(SubmitAnswer, "POST", "/cluster/stop")

    async def events(self, limit: int = 100) -> list[Event]:
        return (await self.document(EventsDocument, "GET", "/events", params={"limit": str(limit)})).events

    async def nodes(self) -> NodesDocument:
        return await self.document(NodesDocument, "GET", "/nodes")

    async def etcd(self) -> EtcdDocument:
        return await self.document(EtcdDocument, "GET", "/etcd")

    async def replace_etcd_member(self, req: ReplaceRequest) -> MemberReplaced:
        return await self.document(MemberReplaced, "POST", "/etcd/replace-member",
                                   data=req.model_dump_json(exclude_none=True).encode(),
                                   headers={"Content-Type": "application/json"})

    async def health(self) -> dict[str, Any]:
        """`GET /healthz` of this agent: `{ok, name, registered, etcd_reachable, ready}`."""
        answer: dict[str, Any] = await self.request("GET", "/healthz")
        return answer

    async def status(self) -> dict[str, Any]:
        """`GET /status` of this agent: its node's facts, `processes` and `bootstrap` (each with a pid)."""
        answer: dict[str, Any] = await self.request("GET", "/status")
        return answer

    async def logs(self, process: str, tail: int, follow: bool) -> AsyncIterator[str]:
        """Lines of a process's log on this client's agent (for a node's, `at(its api_url)`)."""
        params = {"tail": str(tail), **({"follow": "1"} if follow else {})}
        timeout = aiohttp.ClientTimeout(total=None if follow else self.timeout_s)
        async with self._session(auth=True) as session, \
                session.get(f"logs/{process}", params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await _body(resp), self.withheld)
            async for line in resp.content:
                yield line.decode(errors="replace")


async def _body(resp: aiohttp.ClientResponse) -> Any:
    """JSON when the agent says so (every answer of ours), else the text (a proxy in between)."""
    return await resp.json(content_type=None) if resp.content_type == "application/json" else await resp.text()
