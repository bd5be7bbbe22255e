"""A small HTTP client for an agent's REST API (what the CLI and the demo talk through).

Answers come back as the document models the routes serialize (`pdsupervisor.core.documents`).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import ValidationError

from pdsupervisor.core.documents import ClusterDocument, ErrorBody, Event, EventsDocument, NodesDocument, SubmitAnswer

DEFAULT_API = "http://127.0.0.1:8470"
D = TypeVar("D", ClusterDocument, EventsDocument, NodesDocument, SubmitAnswer)


class ApiError(Exception):
    """A non-2xx answer: `body` as received; `error`, the agent's error document (None when
    something else answered, e.g. a proxy in between)."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        self.error = _error_body(body)
        message = self.error.error if self.error else body
        problems = (self.error.problems if self.error else None) or []
        lines = [f"HTTP {status}: {message}"] + [f"  {p.field}: {p.message}" for p in problems]
        super().__init__("\n".join(lines))


def _error_body(body: Any) -> ErrorBody | None:
    try:
        return ErrorBody.model_validate(body)
    except ValidationError:
        return None


@dataclass
class ApiClient:
    base_url: str = DEFAULT_API
    token: str | None = None
    ca_file: str | None = None
    timeout_s: float = 10.0
    cert_file: str | None = None  # client certificate, for an agent that requires one
    key_file: str | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not (self.ca_file or self.cert_file):
            return True
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _session(self) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        ssl_ctx = self._ssl()
        return aiohttp.ClientSession(
            base_url=self.base_url.rstrip("/") + "/", headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx),
        )

    async def _answer(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self._session() as session, session.request(method, path.lstrip("/"), **kw) as resp:
            body = await _body(resp)
            if resp.status >= 400:
                raise ApiError(resp.status, body)
            return resp.status, body

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        """The answer's JSON (or text); ApiError on a non-2xx answer."""
        return (await self._answer(method, path, **kw))[1]

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

    async def logs(self, api_url: str, process: str, tail: int, follow: bool) -> AsyncIterator[str]:
        """Lines of a process's log from the agent at `api_url` (its node's own API)."""
        other = dataclasses.replace(self, base_url=api_url)
        params = {"tail": str(tail), **({"follow": "1"} if follow else {})}
        timeout = aiohttp.ClientTimeout(total=None if follow else self.timeout_s)
        async with other._session() as session, session.get(f"logs/{process}", params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await _body(resp))
            async for line in resp.content:
                yield line.decode(errors="replace")


async def _body(resp: aiohttp.ClientResponse) -> Any:
    """JSON when the agent says so (every answer of ours), else the text (a proxy in between)."""
    return await resp.json(content_type=None) if resp.content_type == "application/json" else await resp.text()
