"""Bad REST input: answered fast with a 4xx and a JSON error body naming the field, changing nothing.

- `json_errors` (outermost middleware): every 4xx/5xx aiohttp raises on its own (no such route,
  method not allowed, a body over `MAX_BODY`...) is answered as `ErrorBody` JSON like ours.
- `refuse_control_characters`: CR, LF, NUL or any other control character in the decoded path
  or query is a 400 (a raw one in the request line never gets here: the HTTP parser refuses it).
- `query_int`: a bounded integer query parameter, else 400 naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from pdsupervisor.core.documents import ErrorBody, FieldProblem

MAX_BODY = 1024 * 1024  # bytes: the app's client_max_size; a cluster spec is a few kB
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(message: str, field: str | None = None) -> str:
    """`{"error": message}`, with `problems: [{field, message}]` when a field is named."""
    problems = [FieldProblem(field=field, message=message)] if field else None
    return json.dumps(ErrorBody(error=message, problems=problems).served())


def json_error(kind: type[web.HTTPError], message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> web.HTTPError:
    """An HTTP error to raise whose body is `ErrorBody` JSON (encoded, whatever the message holds)."""
    return kind(text=error_body(message, field), content_type="application/json", headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        field = "body" if exc.status == 413 else None
        text = exc.text or ""
        message = exc.reason if not text or text.startswith(f"{exc.status}:") else text
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.Response(status=exc.status, text=error_body(message, field), content_type="application/json",
                            headers=headers)


@web.middleware
async def refuse_control_characters(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _CONTROL.search(request.path):
        raise json_error(web.HTTPBadRequest, "the path holds a control character (CR, LF, NUL...)", "path")
    if any(_CONTROL.search(k) or _CONTROL.search(v) for k, v in request.query.items()):
        raise json_error(web.HTTPBadRequest, "the query holds a control character (CR, LF, NUL...)", "query")
    return await handler(request)


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """Query parameter `name` as an integer in [low, high]; absent: `default`; else a 400 naming it."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise json_error(web.HTTPBadRequest, f"{name} must be a whole number from {low} to {high}", name)
    return value
