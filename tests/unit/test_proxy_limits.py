"""The proxy's input checks on their own: the depth bound's edges, and what each refusal says."""

from __future__ import annotations

import json

import pytest

from pdsupervisor.proxy.errors import ProxyError
from pdsupervisor.proxy.limits import MAX_DEPTH, nested_deeper_than, parse_body


def arrays(n: int) -> list:
    return json.loads("[" * n + "]" * n)


@pytest.mark.parametrize(("value", "depth"), [
    ("x", 0), (1, 0), (None, 0), ({}, 1), ([], 1), ({"a": 1, "b": "[{"}, 1), ([1, "x", None, 2.5], 1),
    ({"a": {}}, 2), ({"a": [1, 2]}, 2), ({"a": 1, "b": [1, "x", None, {"c": {}}]}, 4),
    (arrays(64), 64), ({"a": arrays(63)}, 64), ({"a": [{"b": arrays(61)}]}, 64), ({"a": [{}, [[[]]]]}, 5),
])
def test_depth_is_counted_level_by_level(value, depth):
    assert not nested_deeper_than(value, depth)
    assert nested_deeper_than(value, depth - 1) == (depth > 0)


def body(depth: int) -> bytes:
    return b'{"prompt":"x","a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_parse_body_bounds_the_depth_cheaply_and_exactly():
    assert parse_body(body(MAX_DEPTH))["prompt"] == "x"
    for raw in (body(MAX_DEPTH + 1), body(5000), b"[" * 100_000):
        with pytest.raises(ProxyError) as exc:
            parse_body(raw)
        assert (exc.value.status, exc.value.param) == (400, "body") and f"more than {MAX_DEPTH} levels" in exc.value.message
    # more openers than levels allowed, in strings or side by side: the walk finds it shallow
    assert parse_body(json.dumps({"prompt": "{[" * 500, "x": [[1]] * 500}).encode())["x"][0] == [1]


@pytest.mark.parametrize(("raw", "words"), [
    (b"{oops", "not valid JSON: Expecting property name"), (b"", "not valid JSON"),
    (b"[1]", "must be a non-empty JSON object"), (b"{}", "must be a non-empty JSON object"),
    (b'{"a": "\xff"}', "not UTF-8: invalid start byte at byte 7"),
])
def test_each_refusal_says_what_is_wrong(raw, words):
    with pytest.raises(ProxyError) as exc:
        parse_body(raw)
    assert exc.value.status == 400 and exc.value.param == "body" and words in exc.value.message
