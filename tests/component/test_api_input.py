"""Bad REST input against a real agent: a 4xx with a JSON error body naming the field, and
nothing changed in etcd (oversized bodies, deep nesting, control characters, bounded integers)."""

from __future__ import annotations

import json

import pytest

from tests.cluster_helpers import private_token, single_agent
from tests.rest_helpers import call, unchanged

TOKEN = "input-t0ken"
CLUSTER = "input-test"
YAML = {"Content-Type": "application/yaml", "Authorization": f"Bearer {TOKEN}"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def agent(etcd_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("input")
    with single_agent(tmp, etcd_server.endpoint, CLUSTER, token_file=private_token(tmp, TOKEN),
                      log_text="one\ntwo\n") as c:
        yield c


def problem_fields(answer) -> list[str]:
    assert isinstance(answer, dict) and answer["error"], answer
    return [p["field"] for p in answer.get("problems", [])]


def test_oversized_body_is_413_json(agent):
    body = b"a: " + b"x" * (1024 * 1024)
    status, answer, headers = unchanged(agent, lambda: call(agent.api(), "POST", "/cluster/start", body, YAML))
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert problem_fields(answer) == ["body"]


def test_oversized_chunked_body_is_413_json(agent):
    """No Content-Length to refuse up front: the agent stops reading at the limit."""
    chunks = (b"x" * 65536 for _ in range(20))  # 1.25 MiB
    status, answer, _ = unchanged(agent, lambda: call(agent.api(), "POST", "/cluster/start", chunks, YAML))
    assert status == 413 and problem_fields(answer) == ["body"]


@pytest.mark.parametrize("body, content_type", [
    (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    (b"cluster: " + b"{a: " * 50_000, "application/yaml"),
    ("".join(" " * i + f"k{i}:\n" for i in range(1000)).encode(), "application/yaml"),
])
def test_deep_nesting_is_400_not_a_crash(agent, body, content_type):
    headers = {**YAML, "Content-Type": content_type}
    status, answer, _ = unchanged(agent, lambda: call(agent.api(), "POST", "/cluster/start", body, headers))
    assert status == 400 and problem_fields(answer) == ["spec"]
    assert "nested deeper than" in answer["problems"][0]["message"]
    assert agent.agents["n1"].proc.poll() is None  # the agent lives on


@pytest.mark.parametrize("path, field", [
    ("/logs/p%0d%0aX-Injected:%201", "path"),
    ("/logs/p%00", "path"),
    ("/cluster%0a", "path"),
    ("/events?limit=1%0d%0a", "query"),
])
def test_control_characters_in_path_or_query_are_400(agent, path, field):
    status, answer, _ = call(agent.api(), "GET", path, headers=AUTH)
    assert status == 400 and problem_fields(answer) == [field]


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=-5", "limit=ten", "limit=" + "9" * 5000])
def test_events_limit_is_bounded(agent, query):
    status, answer, _ = call(agent.api(), "GET", f"/events?{query}")
    assert status == 400 and problem_fields(answer) == ["limit"]
    assert "from 1 to 1000" in answer["error"]


def test_events_limit_within_bounds(agent):
    for limit in (1, 1000):
        status, answer, _ = call(agent.api(), "GET", f"/events?limit={limit}")
        assert status == 200 and len(answer["events"]) <= limit


@pytest.mark.parametrize("tail", ["-1", "100001", "many"])
def test_logs_tail_is_bounded(agent, tail):
    status, answer, _ = call(agent.api(), "GET", f"/logs/p?tail={tail}", headers=AUTH)
    assert status == 400 and problem_fields(answer) == ["tail"]
    status, text, _ = call(agent.api(), "GET", "/logs/p?tail=1", headers=AUTH)
    assert status == 200 and text == "two\n"


def test_unknown_routes_and_methods_answer_json(agent):
    status, answer, _ = call(agent.api(), "GET", "/nope")
    assert status == 404 and answer["error"]
    status, answer, headers = call(agent.api(), "GET", "/cluster/start")
    assert status == 405 and answer["error"] and "POST" in headers["allow"]
    assert json.dumps(answer)  # a JSON document, not aiohttp's text page
