"""Bad client input: a 4xx with an OpenAI-shaped JSON error naming what is wrong, and no engine
sees the request. A real proxy in front of real simulated engines, shared by the module; each
test counts what the engines received around its own requests."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection

import pytest

from tests.pdproc import Procs, http, metric

LIMIT = 100_000  # the proxy's --max-body-bytes here


@dataclass
class PD:
    base: str
    port: int
    engines: list[str]

    def received(self) -> float:
        """Completion requests the engines received (refused ones too), and the proxy's upstream calls."""
        return sum(metric(f"http://{e}", "vllm:sim_requests_received_total") for e in self.engines) + metric(
            self.base, "pdproxy_upstream_requests_total")


@pytest.fixture(scope="module")
def pd(tmp_path_factory) -> Iterator[PD]:
    procs = Procs(tmp_path_factory.mktemp("proxy-input"))
    try:
        pre, _ = procs.engine("prefill")
        dec, _ = procs.engine("decode")
        base, _ = procs.proxy("--prefill", pre, "--decode", dec, "--max-body-bytes", str(LIMIT))
        yield PD(base, int(base.rsplit(":", 1)[1]), [pre, dec])
    finally:
        procs.kill_all()


@pytest.fixture
def untouched(pd) -> Iterator[PD]:
    """The engines must see nothing of what the test sends."""
    before = pd.received()
    yield pd
    assert pd.received() == before, "a refused request reached an engine"


def refused(status: int, body: bytes, code: int, param: str | None, words: str) -> dict:
    """The OpenAI-shaped error: its code, the part of the request named, a message saying what is wrong."""
    assert status == code, (status, body[:300])
    err = json.loads(body)["error"]
    assert err["code"] == code and err["param"] == param and words in err["message"], err
    assert err["type"].endswith("Error")
    return err


def nested(depth: int) -> bytes:
    """An object whose "a" holds arrays nested so that the whole body is `depth` levels deep."""
    inner = depth - 1
    return b'{"prompt":"x","max_tokens":1,"a":' + b"[" * inner + b"]" * inner + b"}"


def test_a_good_request_reaches_both_engines(pd):
    """The control for `untouched`: the counters do move when a request goes through."""
    before = pd.received()
    assert http("POST", pd.base + "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
    assert pd.received() == before + 4  # prefill and decode each received one; two upstream calls


def test_body_over_the_limit_is_a_json_413(untouched):
    body = b'{"prompt":"' + b"x" * LIMIT + b'"}'
    status, out = http("POST", untouched.base + "/v1/completions", body)
    err = refused(status, out, 413, "body", f"over the proxy's limit of {LIMIT} bytes")
    assert f"{len(body)} bytes" in err["message"] and err["type"] == "RequestTooLargeError"


def test_chunked_body_over_the_limit_is_a_json_413(untouched):
    conn = HTTPConnection("127.0.0.1", untouched.port, timeout=10)
    try:
        chunks = [b'{"prompt":"'] + [b"x" * 10_000] * 11 + [b'"}']
        conn.request("POST", "/v1/completions", body=iter(chunks), encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        refused(resp.status, resp.read(), 413, "body", f"over the proxy's limit of {LIMIT} bytes")
    finally:
        conn.close()


def test_a_declared_huge_body_is_refused_before_it_is_sent(untouched):
    """Content-Length alone decides: the 413 comes without a byte of the body, and says the
    connection ends there."""
    conn = HTTPConnection("127.0.0.1", untouched.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "1000000000000")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.getheader("Connection") == "close" and resp.getheader("Content-Type") == "application/json"
        refused(resp.status, resp.read(), 413, "body", "1000000000000 bytes")
    finally:
        conn.close()


def test_a_body_of_exactly_the_limit_is_accepted(pd):
    body = b'{"prompt":"x","max_tokens":1}'
    body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(body) == LIMIT
    assert http("POST", pd.base + "/v1/completions", body)[0] == 200


def test_nesting_deeper_than_64_is_a_400(untouched):
    status, out = http("POST", untouched.base + "/v1/completions", nested(65))
    refused(status, out, 400, "body", "more than 64 levels deep")


@pytest.mark.parametrize("body", [b"[" * 40_000 + b"]" * 40_000, b'{"prompt":' + b"[" * 90_000],
                         ids=["array", "object-unclosed"])
def test_a_very_deep_body_is_a_400_not_a_recursion_error(untouched, body):
    status, out = http("POST", untouched.base + "/v1/completions", body)
    refused(status, out, 400, "body", "more than 64 levels deep")
    assert http("GET", untouched.base + "/health")[0] == 200  # and the proxy carries on


def test_nesting_of_64_and_brackets_in_strings_are_accepted(pd):
    assert http("POST", pd.base + "/v1/completions", nested(64))[0] == 200
    brackets = {"prompt": "[{" * 1000, "max_tokens": 1}  # many openers, none of them structure
    assert http("POST", pd.base + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "[{" * 1000}], "max_tokens": 1})[0] == 200
    assert http("POST", pd.base + "/v1/completions", brackets)[0] == 200


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"1", b"null", b"{}", b"true"])
def test_a_body_that_is_not_a_non_empty_object_is_a_400(untouched, body):
    status, out = http("POST", untouched.base + "/v1/chat/completions", body)
    refused(status, out, 400, "body", "must be a non-empty JSON object")


@pytest.mark.parametrize(("body", "words"), [
    (b"{oops", "not valid JSON"), (b"", "not valid JSON"),
    ('{"prompt": "caf\u00e9"}'.encode("latin-1"), "not UTF-8"),
    ('{"prompt": "x"}'.encode("utf-16"), "not UTF-8"),
])
def test_a_body_that_is_not_utf8_json_is_a_400(untouched, body, words):
    status, out = http("POST", untouched.base + "/v1/completions", body)
    refused(status, out, 400, "body", words)


@pytest.mark.parametrize("path", ["/v1/completions%0D%0AX-Injected:%201", "/v1/completions%00", "/v1/%0A/models",
                                  "/nowhere%7F"])
def test_control_characters_in_the_path_are_a_400(untouched, path):
    status, out = http("POST", untouched.base + path, {"prompt": "x"})
    refused(status, out, 400, "path", "control character")
    status, out = http("GET", untouched.base + path)
    refused(status, out, 400, "path", "control character")


@pytest.mark.parametrize("raw", [b"/v1/completions\r", b"/v1/comp\x00letions", b"/v1/comp\tletions"])
def test_raw_control_characters_never_reach_a_route(untouched, raw):
    """Unescaped in the request line, aiohttp's HTTP parser refuses them (its own plain-text 400,
    before there is a request to answer in JSON). A raw LF ends the request line instead: the
    path that reaches the proxy has none."""
    with socket.create_connection(("127.0.0.1", untouched.port), timeout=10) as s:
        s.sendall(b"POST " + raw + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head = s.recv(65536)
    assert head.split(b" ", 2)[1] == b"400", head[:200]


def test_no_such_route_and_wrong_method_are_json(untouched):
    status, out = http("POST", untouched.base + "/v1/embeddings", {"input": "x"})
    assert refused(status, out, 404, None, "no route POST /v1/embeddings")["type"] == "NotFoundError"
    req = http("GET", untouched.base + "/v1/completions")
    assert refused(*req, 405, None, "GET is not allowed on /v1/completions; allowed: POST")["type"] == \
        "MethodNotAllowedError"
