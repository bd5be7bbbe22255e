"""How the proxy says no: an OpenAI-shaped JSON error, `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import json

from aiohttp import web

JSON_HEADERS = {"Content-Type": "application/json"}


class ProxyError(Exception):
    """Ends a request with an OpenAI-shaped error; `param` names the part of the request at fault."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type_, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The error as a response. A 413 also ends the connection (`Connection: close`): the client
    may still be sending the body that was refused. aiohttp drops what arrives meanwhile for at
    most its lingering time (10 s), so that the client reads the answer rather than a reset."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}}).encode()
    resp = web.Response(status=status, body=body, headers={**(headers or {}), **JSON_HEADERS})
    if status == 413:
        resp.force_close()
    return resp
