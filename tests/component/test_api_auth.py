"""Who may do what on a real agent's REST API: open reads, a credential (token or client
certificate) for writes and process logs, no browser cross-site writes, JSON or YAML bodies only."""

from __future__ import annotations

import ssl

import pytest
import yaml

from tests.agent_helpers import AgentProc, kill_marked
from tests.certs import TestCA
from tests.cluster_helpers import AgentCluster, cluster_spec, private_token, single_agent
from tests.conftest import wait_for
from tests.rest_helpers import call, unchanged

TOKEN = "auth-t0ken"
SECRET_LINE = "HF_TOKEN=hf_do_not_show\n"
OPEN_READS = ("/healthz", "/status", "/cluster", "/nodes", "/events", "/openapi.yaml")


LOG_TEXT = "starting\n" + SECRET_LINE


def _write_log(agent: AgentProc) -> None:
    (agent.state_dir / "logs" / "p.log").write_text(LOG_TEXT)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return private_token(tmp_path_factory.mktemp("auth-token"), TOKEN)


@pytest.fixture(scope="module")
def guarded(etcd_server, tmp_path_factory, token_file):
    """One agent with a token file, on 127.0.0.1."""
    with single_agent(tmp_path_factory.mktemp("auth"), etcd_server.endpoint, "auth-test", token_file=token_file,
                      log_text=LOG_TEXT) as c:
        yield c


@pytest.fixture(scope="module")
def unguarded(etcd_server, tmp_path_factory):
    """One agent without any credential: loopback only, as the demo runs."""
    with single_agent(tmp_path_factory.mktemp("auth-open"), etcd_server.endpoint, "auth-open",
                      log_text=LOG_TEXT) as c:
        yield c


def spec_body(c: AgentCluster) -> bytes:
    return yaml.safe_dump(cluster_spec(c.cluster, c.etcd, decode_nodes=["n2"])).encode()


def bearer(scheme: str = "Bearer", token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


# ---- credentials --------------------------------------------------------------------


@pytest.mark.parametrize("auth", [{}, bearer(token="wrong"), {"Authorization": f"Basic {TOKEN}"},
                                  {"Authorization": TOKEN}, bearer(token="")])
def test_unauthenticated_writes_are_401_and_change_nothing(guarded, auth):
    for path, body in (("/cluster/start", spec_body(guarded)), ("/cluster/stop", None)):
        headers = {**auth, **({"Content-Type": "application/yaml"} if body else {})}
        status, answer, got = unchanged(guarded, lambda p=path, b=body, h=headers: call(guarded.api(), "POST", p, b, h))
        assert status == 401 and "token" in answer["error"] and got["www-authenticate"] == "Bearer", (path, auth)


def test_bearer_scheme_is_case_insensitive(guarded):
    status, answer, _ = call(guarded.api(), "POST", "/cluster/start", spec_body(guarded),
                             {**bearer("bearer"), "Content-Type": "application/yaml"})
    assert status == 202, answer
    status, answer, _ = call(guarded.api(), "POST", "/cluster/stop", None, bearer("BEARER"))
    assert status == 202, answer
    guarded.wait_phase("stopped", 15)


def test_reads_stay_open(guarded):
    for path in OPEN_READS:
        status, _, _ = call(guarded.api(), "GET", path)
        assert status == 200, path


def test_process_logs_need_the_token(guarded):
    for query in ("", "?tail=5", "?follow=1"):
        status, answer, _ = call(guarded.api(), "GET", f"/logs/p{query}", headers=bearer(token="wrong"))
        assert status == 401 and "hf_do_not_show" not in str(answer), query
        status, answer, _ = call(guarded.api(), "GET", f"/logs/p{query}")
        assert status == 401 and "hf_do_not_show" not in str(answer), query
    status, text, _ = call(guarded.api(), "GET", "/logs/p?tail=1", headers=bearer("bearer"))
    assert status == 200 and text == SECRET_LINE


def test_the_token_is_read_once_at_start(guarded, token_file):
    token_file.write_text("a-new-token\n")  # an agent restart would read it; this one does not
    try:
        assert call(guarded.api(), "POST", "/cluster/stop", None, bearer())[0] == 202
        assert call(guarded.api(), "POST", "/cluster/stop", None, bearer(token="a-new-token"))[0] == 401
        token_file.write_text("")
        assert call(guarded.api(), "POST", "/cluster/stop", None, bearer())[0] == 202
        assert call(guarded.api(), "POST", "/cluster/stop", None, {})[0] == 401
    finally:
        token_file.write_text(TOKEN + "\n")


def audits(base: str, tls: ssl.SSLContext | None = None) -> list[dict]:
    status, answer, _ = call(base, "GET", "/events?limit=1000", tls=tls)
    assert status == 200
    return [e for e in answer["events"] if e["kind"] == "audit"]


def test_accepted_writes_are_audited_with_caller_and_address(guarded):
    before = len(audits(guarded.api()))
    status, answer, _ = call(guarded.api(), "POST", "/cluster/start", spec_body(guarded),
                             {**bearer(), "Content-Type": "application/yaml"})
    assert status == 202
    generation = answer["generation"]
    status, _, _ = call(guarded.api(), "POST", "/cluster/stop", None, bearer())
    assert status == 202
    guarded.wait_phase("stopped", 15)
    new = audits(guarded.api())[before:]
    assert [(e["method"], e["path"], e["caller"], e["remote"], e["generation"]) for e in new] == [
        ("POST", "/cluster/start", "token", "127.0.0.1", generation),
        ("POST", "/cluster/stop", "token", "127.0.0.1", generation),
    ]
    assert new[0]["message"] == f"POST /cluster/start by token from 127.0.0.1: generation {generation} submitted"
    assert new[1]["message"].endswith(f"stop of generation {generation} requested")


def test_refused_writes_are_not_audited(guarded):
    before = audits(guarded.api())
    assert call(guarded.api(), "POST", "/cluster/stop", None, {})[0] == 401
    assert call(guarded.api(), "POST", "/cluster/stop", None, {**bearer(), "Origin": "http://evil.example"})[0] == 403
    assert audits(guarded.api()) == before


# ---- what a browser can send ----------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/octet-stream", None])
def test_writes_take_only_json_or_yaml(guarded, content_type):
    headers = {**bearer(), **({"Content-Type": content_type} if content_type else {})}
    status, answer, _ = unchanged(guarded, lambda: call(guarded.api(), "POST", "/cluster/start", spec_body(guarded),
                                                          headers))
    assert status == 415 and answer["problems"][0]["field"] == "Content-Type"
    assert "application/json, application/yaml, application/x-yaml, text/yaml" in answer["error"]


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain"])
def test_a_post_without_a_body_may_carry_any_type(guarded, content_type):
    """`/cluster/stop` has no body: curl sends no type, aiohttp's client application/octet-stream."""
    headers = {**bearer(), **({"Content-Type": content_type} if content_type else {})}
    assert call(guarded.api(), "POST", "/cluster/stop", None, headers)[0] == 202


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml; charset=utf-8", "application/x-yaml",
                                          "text/yaml"])
def test_json_and_yaml_types_are_taken(guarded, content_type):
    spec = cluster_spec(guarded.cluster, guarded.etcd, decode_nodes=["n2"])
    spec["prefill"]["tp"] = 3  # invalid: a 400 from the handler means the body got through
    status, answer, _ = call(guarded.api(), "POST", "/cluster/start", yaml.safe_dump(spec).encode(),
                             {**bearer(), "Content-Type": content_type})
    assert status == 400 and answer["problems"], answer


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1:{port}",
                                    "http://localhost.evil.example:{port}"])
def test_foreign_origin_is_403_even_with_the_token(guarded, origin):
    agent = guarded.agents["n1"]
    headers = {**bearer(), "Origin": origin.format(port=agent.port)}
    status, answer, _ = unchanged(guarded, lambda: call(guarded.api(), "POST", "/cluster/stop", None, headers))
    assert status == 403 and answer["problems"][0]["field"] == "Origin"
    status, answer, _ = call(guarded.api(), "GET", "/logs/p", headers=headers)
    assert status == 403 and "hf_do_not_show" not in str(answer)


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:{port}", "http://[::1]:{port}"])
def test_own_origin_is_fine(guarded, origin):
    headers = {**bearer(), "Origin": origin.format(port=guarded.agents["n1"].port)}
    assert call(guarded.api(), "POST", "/cluster/stop", None, headers)[0] == 202


def test_the_measured_browser_attack_on_an_agent_without_credentials(unguarded):
    """What a web page can send to a loopback agent: text/plain, its own Origin, no token."""
    headers = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    status, answer, _ = unchanged(unguarded, lambda: call(unguarded.api(), "POST", "/cluster/start",
                                                            spec_body(unguarded), headers))
    assert status == 403 and answer["problems"][0]["field"] == "Origin"
    # the same without an Origin (not a browser) is still refused for its type
    status, answer, _ = unchanged(unguarded, lambda: call(unguarded.api(), "POST", "/cluster/start",
                                                            spec_body(unguarded), {"Content-Type": "text/plain"}))
    assert status == 415


def test_without_credentials_only_loopback_host_names_are_served(unguarded):
    """A page whose DNS name was rebound to 127.0.0.1 sends its own name as Host."""
    port = unguarded.agents["n1"].port
    evil = {"Host": f"evil.example:{port}"}
    assert unchanged(unguarded, lambda: call(unguarded.api(), "POST", "/cluster/stop", None, evil))[0] == 403
    status, answer, _ = call(unguarded.api(), "GET", "/logs/p", headers=evil)
    assert status == 403 and answer["problems"][0]["field"] == "Host"
    assert call(unguarded.api(), "GET", "/cluster", headers=evil)[0] == 200  # open reads stay open
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, text, _ = call(unguarded.api(), "GET", "/logs/p?tail=1", headers={"Host": host})
        assert status == 200 and text == SECRET_LINE
    assert call(unguarded.api(), "POST", "/cluster/stop", None, {})[0] == 202
    last = audits(unguarded.api())[-1]
    assert (last["caller"], last["path"], last["message"]) == (
        "local", "/cluster/stop", "POST /cluster/stop by local from 127.0.0.1: nothing to stop")


# ---- client certificates ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA(d / "ca")
    other = TestCA(d / "other", name="other-ca")
    return {"ca": ca, "server": ca.issue("server", "n1", server=True), "alice": ca.issue("alice", "alice"),
            "mallory": other.issue("mallory", "mallory")}


def tls_agent(tmp, etcd, cluster, pki, token_file=None) -> AgentProc:
    rest = {"tls_cert": str(pki["server"].cert), "tls_key": str(pki["server"].key), "tls_client_ca": str(pki["ca"].path)}
    if token_file:
        rest["token_file"] = str(token_file)
    config = tmp / f"{cluster}.yaml"
    config.write_text(yaml.safe_dump({"rest": rest}))
    return AgentProc(tmp, etcd, cluster, extra=["--config", str(config)])


def client(pki, who: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    if who:
        ctx.load_cert_chain(str(pki[who].cert), str(pki[who].key))
    return ctx


@pytest.fixture(scope="module")
def mtls(etcd_server, tmp_path_factory, pki, token_file):
    """An agent with a token and a client CA: certificates optional in the handshake."""
    tmp = tmp_path_factory.mktemp("mtls")
    a = tls_agent(tmp, etcd_server.endpoint, "auth-mtls", pki, token_file).start()
    try:
        base = f"https://127.0.0.1:{a.port}"
        wait_for(lambda: _answers(base, client(pki)), 20, what=f"the agent's https API\n{a.logs()}")
        _write_log(a)
        yield base
    finally:
        a.sigterm()
        kill_marked(a.marker)


def _answers(base: str, tls: ssl.SSLContext) -> bool:
    try:
        return call(base, "GET", "/healthz", tls=tls)[0] == 200
    except OSError:
        return False


def test_client_certificate_is_a_credential_and_optional_for_reads(mtls, pki):
    for path in OPEN_READS:
        assert call(mtls, "GET", path, tls=client(pki))[0] == 200, path  # no certificate, no token
    assert call(mtls, "POST", "/cluster/stop", tls=client(pki))[0] == 401
    assert call(mtls, "GET", "/logs/p", tls=client(pki))[0] == 401
    assert call(mtls, "POST", "/cluster/stop", tls=client(pki, "alice"))[0] == 202  # the certificate alone
    assert audits(mtls, client(pki))[-1]["caller"] == "cert:alice"
    status, text, _ = call(mtls, "GET", "/logs/p?tail=1", tls=client(pki, "alice"))
    assert status == 200 and text == SECRET_LINE
    assert call(mtls, "POST", "/cluster/stop", headers=bearer(), tls=client(pki))[0] == 202  # the token alone
    assert audits(mtls, client(pki))[-1]["caller"] == "token"


def test_a_certificate_from_another_ca_fails_the_handshake(mtls, pki):
    with pytest.raises(OSError):
        call(mtls, "GET", "/healthz", tls=client(pki, "mallory"))


def test_client_ca_alone_requires_a_certificate_of_every_client(etcd_server, tmp_path, pki):
    a = tls_agent(tmp_path, etcd_server.endpoint, "auth-mtls-only", pki).start()
    try:
        base = f"https://127.0.0.1:{a.port}"
        wait_for(lambda: _answers(base, client(pki, "alice")), 20, what=f"the agent's https API\n{a.logs()}")
        with pytest.raises(OSError):
            call(base, "GET", "/healthz", tls=client(pki))
        assert call(base, "POST", "/cluster/stop", tls=client(pki, "alice"))[0] == 202
    finally:
        a.sigterm()
        kill_marked(a.marker)
