"""Where the `pdsupervisor` CLI sends the bearer token: to the API it was given, only on requests
that need it; to a node's `api_url` read from etcd only when loopback or https verified by the
cluster CA. The CLI runs as a real process; agents are recorded (headers as received) or real."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from aiohttp import web

from pdsupervisor.host import probes
from pdsupervisor.local.ports import free_port
from tests.agent_helpers import ROOT
from tests.certs import TestCA
from tests.cluster_helpers import private_token, single_agent
from tests.conftest import wait_for

TOKEN = "cli-t0ken"


class Recorder:
    """An HTTP server that answers fixed documents and records (method, path, Authorization)."""

    def __init__(self, host: str, name: str, tls=None) -> None:
        self.host, self.name, self.tls = host, name, tls
        self.port = free_port()
        self.seen: list[tuple[str, str, str | None]] = []
        self.answers: dict[str, tuple[int, Any]] = {"/healthz": (200, {"ok": True, "name": name})}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        status, body = self.answers.get(request.path, (404, {"error": "no such route"}))
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, ssl_context=self.tls).start()

    def start(self) -> Recorder:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def recorders():
    started: list[Recorder] = []

    def start(host: str = "127.0.0.1", name: str = "n1", tls=None) -> Recorder:
        r = Recorder(host, name, tls).start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDSUPERVISOR_")}
    return subprocess.run([sys.executable, "-m", "pdsupervisor", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})


def nodes_doc(**api_urls: str) -> dict[str, Any]:
    return {"leader": "n1", "nodes": [{"name": n, "ip": "10.0.0.1", "api_url": u} for n, u in api_urls.items()]}


BEARER = f"Bearer {TOKEN}"
EMPTY_CLUSTER = {"cluster": "c", "generation": 0, "action": None, "phase": "stopped", "leader": None, "missing": [],
                 "problems": [], "start_timed_out": False, "members": [], "placement": {}, "proxy_url": None,
                 "processes": []}


def non_loopback_ip() -> str:
    ip = probes.default_ip()
    if not ip or ip.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return ip


def test_token_only_on_requests_that_need_it(recorders, token_file):
    api = recorders()
    api.answers.update({"/cluster": (200, EMPTY_CLUSTER), "/events": (200, {"events": []}),
                        "/nodes": (200, nodes_doc()), "/cluster/stop": (202, {"generation": 0, "message": ""})})
    for command in ("status", "events", "stop"):
        out = cli(command, "--api", api.url, "--token-file", str(token_file))
        assert out.returncode == 0, out.stderr
    assert api.seen == [("GET", "/etcd", None), ("GET", "/cluster", None), ("GET", "/events", None),
                        ("POST", "/cluster/stop", BEARER)]


def test_logs_from_a_loopback_api_url_get_the_token(recorders, token_file):
    api, node = recorders(), recorders(name="n2")
    api.answers["/nodes"] = (200, nodes_doc(n2=node.url))
    node.answers["/logs/p"] = (200, "a line\n")
    out = cli("logs", "n2", "p", "--api", api.url, "--token-file", str(token_file))
    assert out.returncode == 0 and out.stdout == "a line\n", out.stderr
    assert api.seen == [("GET", "/nodes", None)]
    assert node.seen == [("GET", "/healthz", None), ("GET", "/logs/p", BEARER)]


def test_never_over_plain_http_read_from_etcd(recorders, token_file):
    ip = non_loopback_ip()
    api, node = recorders(), recorders(host=ip, name="n2")
    api.answers["/nodes"] = (200, nodes_doc(n2=node.url))
    node.answers["/logs/p"] = (401, {"error": "missing or wrong bearer token"})
    out = cli("logs", "n2", "p", "--api", api.url, "--token-file", str(token_file),
              env={"PDSUPERVISOR_TOKEN": "from-env"})
    assert out.returncode == 1
    assert node.seen == [("GET", "/healthz", None), ("GET", "/logs/p", None)]
    assert f"the token was not sent: http://{ip}:{node.port} (read from etcd) is plain http" in out.stderr


def test_https_api_url_verified_by_the_cluster_ca_gets_the_token(recorders, token_file, tmp_path):
    import ssl

    ip = non_loopback_ip()
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("server", "n2", server=True, ips=(ip,))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(server.cert), str(server.key))
    api, node = recorders(), recorders(host=ip, name="n2", tls=tls)
    api.answers["/nodes"] = (200, nodes_doc(n2=node.url))
    node.answers["/logs/p"] = (200, "over https\n")
    out = cli("logs", "n2", "p", "--api", api.url, "--token-file", str(token_file), "--ca-file", str(ca.path))
    assert out.returncode == 0 and out.stdout == "over https\n", out.stderr
    assert node.seen == [("GET", "/healthz", None), ("GET", "/logs/p", BEARER)]


def test_an_api_url_answering_as_another_node_is_refused(recorders, token_file):
    api, node = recorders(), recorders(name="n1")  # n2's facts say 127.0.0.1: n1's own agent answers there
    api.answers["/nodes"] = (200, nodes_doc(n2=node.url))
    out = cli("logs", "n2", "p", "--api", api.url, "--token-file", str(token_file))
    assert out.returncode == 1 and "answers as 'n1'" in out.stderr
    assert node.seen == [("GET", "/healthz", None)]  # no logs asked for, no token sent


def test_empty_token_file_is_an_error(recorders, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = cli("stop", "--api", recorders().url, "--token-file", str(empty))
    assert out.returncode == 1 and f"--token-file {empty} is empty" in out.stderr


@pytest.fixture(scope="module")
def guarded(etcd_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    token = private_token(tmp, TOKEN)
    with single_agent(tmp, etcd_server.endpoint, "cli-test", token_file=token, log_text="from the real agent\n") as c:
        wait_for(lambda: [n["name"] for n in c.request("GET", "/nodes")[1]["nodes"]] == ["n1"], 15,
                 what="n1 registered")
        yield c, token


def test_a_401_says_how_to_pass_the_token(guarded):
    c, token = guarded
    out = cli("stop", "--api", c.api())
    assert out.returncode == 1 and "HTTP 401" in out.stderr
    assert "--token-file FILE (env PDSUPERVISOR_TOKEN_FILE)" in out.stderr and "PDSUPERVISOR_TOKEN" in out.stderr
    assert cli("stop", "--api", c.api(), env={"PDSUPERVISOR_TOKEN": TOKEN}).returncode == 0
    assert cli("status", "--api", c.api()).returncode == 0  # reads need none


def test_logs_through_a_real_agent(guarded):
    c, token = guarded
    out = cli("logs", "n1", "p", "--api", c.api(), "--token-file", str(token))
    assert out.returncode == 0 and out.stdout == "from the real agent\n", out.stderr
    out = cli("logs", "n1", "p", "--api", c.api())
    assert out.returncode == 1 and "HTTP 401" in out.stderr and "--token-file" in out.stderr
