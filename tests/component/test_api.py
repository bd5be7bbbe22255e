"""The REST control plane: bad input loses nothing, tokens guard every mutating endpoint."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from agent.api.cluster import openapi_document
from pdsupervisor.core.documents import DOCUMENTS, ErrorBody
from pdsupervisor.store.etcd import Store
from tests.cluster_helpers import cluster_spec, private_token, single_agent
from tests.openapi_helpers import check_served, response_schema
from tests.rest_helpers import etcd_snapshot as _snapshot

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def one_agent(etcd_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    with single_agent(tmp, etcd_server.endpoint, "api-test", token_file=private_token(tmp, TOKEN)) as c:
        yield c


def test_mutating_endpoints_need_the_token(one_agent):
    spec = yaml.safe_dump(cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])).encode()
    before = asyncio.run(_snapshot(one_agent.etcd, "api-test"))
    for path, body in (("/cluster/start", spec), ("/cluster/stop", b"")):
        for token in (None, "wrong"):
            status, answer = one_agent.request("POST", path, body, token=token)
            assert status == 401, (path, token, answer)
            assert "token" in answer["error"]
    assert asyncio.run(_snapshot(one_agent.etcd, "api-test")) == before
    status, _ = one_agent.request("GET", "/cluster")  # reads stay open
    assert status == 200


@pytest.mark.parametrize(
    "mutate, field, why",
    [
        (lambda d: d["decode"].update(tp=3), "decode.tp", "not divisible"),
        (lambda d: d["prefill"].update(bogus=1), "prefill.bogus", "unknown field"),
        (lambda d: d.update(cluster="someone-else"), "cluster", "these agents serve cluster 'api-test'"),
        # no node joining can fix it: refused, not left pending
        (lambda d: d["proxy"].update(port=d["prefill"]["base_port"]), "proxy.port",
         "on node n1 is also prefill.base_port"),
    ],
)
def test_invalid_spec_is_400_naming_the_field_and_changes_nothing(one_agent, mutate, field, why):
    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    mutate(spec)
    before = asyncio.run(_snapshot(one_agent.etcd, "api-test"))
    status, answer = one_agent.submit(spec, token=TOKEN)
    assert status == 400
    assert any(p["field"] == field and why in p["message"] for p in answer["problems"]), answer
    assert asyncio.run(_snapshot(one_agent.etcd, "api-test")) == before


def test_not_yaml_is_400(one_agent):
    status, answer = one_agent.request("POST", "/cluster/start", b"cluster: [unclosed", token=TOKEN)
    assert status == 400 and answer["problems"][0]["field"] == "spec"


def test_pending_says_what_is_missing(one_agent):
    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    status, answer = one_agent.submit(spec, token=TOKEN)
    assert status == 202
    doc = one_agent.wait_phase("pending", 10)
    assert "decode.node_names: node n2 is not registered" in doc["missing"]
    status, _ = one_agent.request("POST", "/cluster/stop", b"", token=TOKEN)
    assert status == 202
    one_agent.wait_phase("stopped", 10)


def test_openapi_document_lists_every_route(one_agent):
    import urllib.request

    with urllib.request.urlopen(one_agent.api() + "/openapi.yaml", timeout=5) as r:
        served = yaml.safe_load(r.read())
    assert served == openapi_document()
    assert {"/cluster/start", "/cluster/stop", "/cluster", "/nodes", "/events", "/healthz"} <= set(served["paths"])
    status, _ = one_agent.request("GET", "/nodes")
    assert status == 200


def test_served_documents_are_what_the_served_openapi_describes(one_agent):
    import urllib.request

    with urllib.request.urlopen(one_agent.api() + "/openapi.yaml", timeout=5) as r:
        openapi = yaml.safe_load(r.read())
    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    invalid = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    invalid["decode"]["tp"] = 3
    other = {**spec, "model": "another-model"}
    body = yaml.safe_dump(spec).encode()
    answers = [  # (path, method, status wanted, (status, JSON) served)
        ("/cluster/start", "post", 401, one_agent.request("POST", "/cluster/start", body)),
        ("/cluster/start", "post", 400, one_agent.submit(invalid, token=TOKEN)),
        ("/cluster/start", "post", 202, one_agent.submit(spec, token=TOKEN)),
    ]
    try:
        answers.append(("/cluster/start", "post", 409, one_agent.submit(other, token=TOKEN)))
        one_agent.wait_phase("pending", 10)
        for path in ("/cluster", "/nodes", "/events?limit=100", "/etcd"):
            answers.append((path.split("?")[0], "get", 200, one_agent.request("GET", path)))
        for want, replace in ((409, {"name": "test", "peer_url": "http://127.0.0.9:2380"}),
                              (400, {"name": "test", "peer_url": "127.0.0.9"})):
            answers.append(("/etcd/replace-member", "post", want, one_agent.request(
                "POST", "/etcd/replace-member", json.dumps(replace).encode(), token=TOKEN)))
    finally:
        answers.append(("/cluster/stop", "post", 202, one_agent.request("POST", "/cluster/stop", b"", token=TOKEN)))
        one_agent.wait_phase("stopped", 10)
    models = {m.__name__: m for m in DOCUMENTS}
    for path, method, want, (status, served) in answers:
        assert status == want, (path, served)
        name = response_schema(openapi, path, method, status)
        check_served(openapi, name, served)
        read = models[name].model_validate(served)  # what the client reads
        assert (read.served() if isinstance(read, ErrorBody) else read.model_dump(mode="json")) == served
    by = {(path, status): doc for path, _, _, (status, doc) in answers}
    assert by["/cluster", 200]["phase"] == "pending" and by["/cluster", 200]["missing"]
    assert [n["name"] for n in by["/nodes", 200]["nodes"]] == ["n1"]
    assert any(set(e) - {"ts", "kind", "message"} for e in by["/events", 200]["events"])  # an event's own fields
    assert by["/cluster/start", 400]["problems"]
    etcd = by["/etcd", 200]  # the fixture's one-member etcd, named "test"
    assert (etcd["up"], etcd["leader"], etcd["members"][0]["name"]) == (1, "test", "test")
    assert etcd["members"][0]["db_size"] > 0 and etcd["members"][0]["raft_term"] >= 1
    assert "member test is up" in by["/etcd/replace-member", 409]["error"]
    assert by["/etcd/replace-member", 400]["problems"][0]["field"] == "peer_url"
    assert by["/cluster/start", 409]["generation"] == by["/cluster", 200]["generation"]


async def _member_lease_ttls(etcd: str, cluster: str) -> dict[str, int]:
    async with Store([etcd], cluster) as store:
        kvs, _ = await store.get_prefix(store.keys.members)
        out = {kv.key.rsplit("/", 1)[-1]: await store.lease_granted_ttl(kv.lease) for kv in kvs}
        out["leader"] = 0
        leader = await store.get(store.keys.leader)
        if leader is not None:
            out["leader"] = await store.lease_granted_ttl(leader.lease)
        return out


def test_spec_lease_ttl_governs_member_and_leader_leases(one_agent):
    from tests.conftest import wait_for

    # the REST API answers before the agent registers: wait for its member key, then read its lease
    ttls = wait_for(lambda: (t := asyncio.run(_member_lease_ttls(one_agent.etcd, "api-test"))) and "n1" in t and t,
                    15, what="n1 registered")
    assert ttls["n1"] == 3  # the agent's own
    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"], ttl=7)
    status, _ = one_agent.submit(spec, token=TOKEN)
    assert status == 202
    wait_for(lambda: asyncio.run(_member_lease_ttls(one_agent.etcd, "api-test")) == {"n1": 7, "leader": 7}, 15,
             what="member and leader leases on the spec's TTL")
    status, _ = one_agent.request("POST", "/cluster/stop", b"", token=TOKEN)
    assert status == 202
    one_agent.wait_phase("stopped", 10)


def test_start_wait_fails_with_the_reason_after_the_start_timeout(one_agent, tmp_path):
    import subprocess
    import sys

    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    spec["policy"]["start_timeout_s"] = 1
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    try:
        run = subprocess.run([sys.executable, "-m", "pdsupervisor", "start", "-f", str(path), "--wait",
                              "--api", one_agent.api(), "--token-file", str(token)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 1
        assert "start failed: cluster not ready" in run.stderr and "policy.start_timeout_s 1" in run.stderr
        assert "missing: decode.node_names: node n2 is not registered" in run.stdout  # progress said why
    finally:
        one_agent.request("POST", "/cluster/stop", b"", token=TOKEN)
        one_agent.wait_phase("stopped", 10)


def _cli(one_agent, tmp_path, spec: dict, *args: str):
    import subprocess
    import sys

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    run = subprocess.run([sys.executable, "-m", "pdsupervisor", "start", "-f", str(path), *args,
                          "--api", one_agent.api(), "--token-file", str(token)],
                         capture_output=True, text=True, timeout=60)
    return path, run


def test_start_of_an_invalid_spec_exits_2_naming_each_field(one_agent, tmp_path):
    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    spec["proxy"]["port"] = 70000
    spec["prefill"]["bse_port"] = 1
    path, run = _cli(one_agent, tmp_path, spec)
    assert run.returncode == 2, run.stderr  # as `plan` and `doctor` exit for an invalid spec
    assert f"{path}: invalid (the agent answered HTTP 400):" in run.stderr
    assert "  proxy.port: Input should be less than or equal to 65535" in run.stderr
    assert "  prefill.bse_port: unknown field; did you mean `base_port`?" in run.stderr


def test_a_409_names_replace(one_agent, tmp_path):
    spec = cluster_spec("api-test", one_agent.etcd, decode_nodes=["n2"])
    assert one_agent.submit(spec, token=TOKEN)[0] == 202
    try:
        path, run = _cli(one_agent, tmp_path, {**spec, "model": "another-model"})
        assert run.returncode == 1 and "HTTP 409" in run.stderr
        assert (f"another spec is running; `pdsupervisor start --replace -f {path}` to replace it "
                "(or `pdsupervisor stop --wait` first)") in " ".join(run.stderr.split())
        path, run = _cli(one_agent, tmp_path, {**spec, "model": "another-model"}, "--replace")
        assert run.returncode == 0 and "accepted: generation" in run.stdout, run.stderr
    finally:
        one_agent.request("POST", "/cluster/stop", b"", token=TOKEN)
        one_agent.wait_phase("stopped", 10)


def test_readyz_once_registered(one_agent):
    from tests.conftest import wait_for

    wait_for(lambda: [n["name"] for n in one_agent.request("GET", "/nodes")[1]["nodes"]] == ["n1"], 15,
             what="n1 registered")
    status, body = wait_for(lambda: (a := one_agent.request("GET", "/readyz"))[0] == 200 and a, 15,
                            what="/readyz 200")
    assert body == {"ok": True, "name": "n1", "registered": True, "etcd_reachable": True, "ready": True}
    assert one_agent.request("GET", "/healthz") == (200, body)


def test_nodes_command_against_a_real_agent(one_agent):
    import json
    import subprocess
    import sys

    from pdsupervisor import __version__
    from tests.conftest import wait_for

    wait_for(lambda: [n["name"] for n in one_agent.request("GET", "/nodes")[1]["nodes"]] == ["n1"], 15,
             what="n1 registered")
    run = subprocess.run([sys.executable, "-m", "pdsupervisor", "nodes", "-o", "json", "--api", one_agent.api()],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (n1,) = json.loads(run.stdout)["nodes"]
    assert n1["name"] == "n1" and n1["ip"] == "127.0.0.1" and n1["agent_version"] == __version__
    assert n1["api_url"] == one_agent.api() and n1["lease_age_s"] >= 0 and n1["roles"] == []
    table = subprocess.run([sys.executable, "-m", "pdsupervisor", "nodes", "--api", one_agent.api()],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and one_agent.api() in table.stdout and __version__ in table.stdout
