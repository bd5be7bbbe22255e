"""Bad client input, refused fast with a 4xx and an OpenAI-shaped JSON error naming what is
wrong, before any engine sees the request.

- The body: at most `--max-body-bytes` (413; a declared Content-Length over the limit is refused
  before reading, a chunked body as soon as it passes it; the connection ends with the answer).
- It must be UTF-8 JSON (400), a non-empty object (400), nested at most `MAX_DEPTH` deep (400).
- `no_route`, the route of last resort: no such route (404) and method not allowed (405) are JSON
  too, and a path holding a control character (CR, LF, NUL...) is a 400. Every route is a fixed
  path without one, so only requests that match no route need that check: none on the hot path
  (a middleware would cost every request a few microseconds).

Cost (the proxy's CPU per request is what bench/proxy_bench.py measures): the depth is checked
without walking the body for nearly every request. Each level needs its own `[` or `{`, so a
body holding at most `MAX_DEPTH` of them (inside strings too), found by memchr scans
(`bytes.find`), is shallow enough. Only a body with more has its decoded value walked, level by
level in C-level iteration: next to nothing when the brackets sit in strings (code in a prompt),
a quarter to a half of its decoding again when it holds many arrays or objects (a long chat,
batches of token ids). A body nested deeper than `json` itself decodes (about 1000 levels) ends
its decoding with RecursionError, also a 400.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Any

from aiohttp import web

from pdsupervisor.proxy.errors import ProxyError, error_response

MAX_DEPTH = 64  # JSON nesting levels; the top-level object is level 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD = "BadRequestError"
_TOO_LARGE = "RequestTooLargeError"
_is_dict = dict.__instancecheck__  # C-level predicates, for filter()
_is_list = list.__instancecheck__


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, at most `limit` bytes (the app's `client_max_size` is the same
    limit: aiohttp stops reading a chunked body past it); else a 413."""
    size = request.content_length
    if size is not None and size > limit:
        raise ProxyError(413, f"request body of {size} bytes is over the proxy's limit of {limit} bytes "
                         "(--max-body-bytes)", _TOO_LARGE, "body")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProxyError(413, f"request body is over the proxy's limit of {limit} bytes (--max-body-bytes)",
                         _TOO_LARGE, "body") from None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a non-empty JSON object nested at most MAX_DEPTH deep; else a 400 saying why."""
    try:
        body = json.loads(raw.decode())
    except UnicodeDecodeError as exc:
        raise ProxyError(400, f"request body is not UTF-8: {exc.reason} at byte {exc.start}", _BAD, "body") from None
    except RecursionError:
        raise ProxyError(400, _too_deep(), _BAD, "body") from None
    except ValueError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}", _BAD, "body") from None
    if not isinstance(body, dict) or not body:
        raise ProxyError(400, "request body must be a non-empty JSON object", _BAD, "body")
    if _brackets_over(raw, MAX_DEPTH) and nested_deeper_than(body, MAX_DEPTH):
        raise ProxyError(400, _too_deep(), _BAD, "body")
    return body


def _too_deep() -> str:
    return f"request body nests JSON arrays and objects more than {MAX_DEPTH} levels deep"


def _brackets_over(raw: bytes, limit: int) -> bool:
    """Whether `raw` holds more than `limit` `[` and `{` together: memchr scans, at most
    `limit + 1` steps in Python whatever the body's size."""
    seen = 0
    for opener in b"[{":
        at = raw.find(opener)
        while at >= 0:
            seen += 1
            if seen > limit:
                return True
            at = raw.find(opener, at + 1)
    return False


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value holds an array or object below level `limit` (`value` is
    level 1), looked for level by level (no recursion), each level's values gathered, typed and
    sorted by C-level iteration (`chain`, `map`, `filter`): no Python step per value."""
    dicts: list[dict[str, Any]] = [value] if type(value) is dict else []
    lists: list[list[Any]] = [value] if type(value) is list else []
    for _ in range(limit):
        children = [*chain.from_iterable(map(dict.values, dicts)), *chain.from_iterable(lists)]
        kinds = set(map(type, children))
        dicts = list(filter(_is_dict, children)) if dict in kinds else []
        lists = list(filter(_is_list, children)) if list in kinds else []
        if not (dicts or lists):
            return False
    return bool(dicts or lists)


async def no_route(request: web.Request) -> web.Response:
    """What matches no route (registered last, for every method and path): a path with a control
    character is a 400 naming it, a known path with another method a 405, anything else a 404.
    aiohttp finds a route by its exact path first, so a request for a route never comes here."""
    path = request.path
    if _CONTROL.search(path):
        return error_response(400, "the path holds a control character (CR, LF, NUL...)", _BAD, "path")
    allowed = sorted({route.method for resource in request.app.router.resources() if resource.canonical == path
                      for route in resource})
    if allowed:
        return error_response(405, f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}",
                              "MethodNotAllowedError", headers={"Allow": ",".join(allowed)})
    return error_response(404, f"no route {request.method} {path[:200]}", "NotFoundError")
