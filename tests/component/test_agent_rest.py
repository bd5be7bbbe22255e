"""The agent's REST app in-process: health, status, logs (tail and follow), token guard."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from agent.api.app import build_app, require_credential
from agent.config import AgentConfig, RestConfig
from agent.daemon import Agent
from pdsupervisor.api.client import ApiClient, ApiError
from pdsupervisor.core.documents import NodesDocument


def make_agent(tmp_path, token: str | None = None) -> Agent:
    rest = RestConfig(port=0)
    if token:
        (tmp_path / "token").write_text(token + "\n")
        rest = RestConfig(port=0, token_file=str(tmp_path / "token"))
    cfg = AgentConfig(name="n1", ip="127.0.0.1", state_dir=str(tmp_path / "state"), rest=rest,
                      etcd=["127.0.0.1:1"], sys_root=str(tmp_path))
    a = Agent(cfg)
    a.log_dir.mkdir(parents=True)
    return a


async def test_health_status_and_logs(aiohttp_client, tmp_path):
    a = make_agent(tmp_path)
    (a.log_dir / "p.log").write_text("".join(f"line {i}\n" for i in range(50)))
    client = await aiohttp_client(build_app(a))
    h = await (await client.get("/healthz")).json()
    assert h["ok"] and h["registered"] is False and h["name"] == "n1"
    st = await (await client.get("/status")).json()
    assert st["node"]["name"] == "n1" and st["processes"] == [] and st["lease_id"] is None
    text = await (await client.get("/logs/p?tail=3")).text()
    assert text == "line 47\nline 48\nline 49\n"
    assert (await client.get("/logs/nope")).status == 404
    assert (await client.get("/logs/..%2fx")).status == 404

    resp = await client.get("/logs/p?tail=1&follow=1")
    assert await resp.content.readline() == b"line 49\n"
    with open(a.log_dir / "p.log", "a") as f:
        f.write("appended\n")
    assert await asyncio.wait_for(resp.content.readline(), 5) == b"appended\n"
    resp.close()


async def test_healthz_is_liveness_and_readyz_says_registration(aiohttp_client, tmp_path):
    a = make_agent(tmp_path)  # its etcd does not answer: never registered
    client = await aiohttp_client(build_app(a))
    alive = await client.get("/healthz")
    assert alive.status == 200 and (await alive.json()) == {
        "ok": True, "name": "n1", "registered": False, "etcd_reachable": False, "ready": False}
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json()) == await alive.json()
    # a registered agent's 200: tests/component/test_api.py


async def test_token_guards_mutating_routes(aiohttp_client, tmp_path):
    a = make_agent(tmp_path, token="s3cret")

    async def mutate(request: web.Request) -> web.Response:
        return web.json_response({"done": True})

    @require_credential
    async def guarded_read(request: web.Request) -> web.Response:
        return web.json_response({"secret": 1})

    client = await aiohttp_client(build_app(a, [web.post("/cluster/start", mutate), web.get("/secret", guarded_read)]))
    assert (await client.post("/cluster/start")).status == 401
    assert (await client.post("/cluster/start", headers={"Authorization": "Bearer wrong"})).status == 401
    ok = await client.post("/cluster/start", headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200 and (await ok.json()) == {"done": True}
    assert (await client.get("/healthz")).status == 200  # reads stay open
    assert (await client.get("/secret")).status == 401
    assert (await client.get("/secret", headers={"Authorization": "Bearer s3cret"})).status == 200


async def test_no_token_configured_leaves_routes_open(aiohttp_client, tmp_path):
    a = make_agent(tmp_path)

    async def mutate(request: web.Request) -> web.Response:
        return web.json_response({"done": True})

    client = await aiohttp_client(build_app(a, [web.post("/x", mutate)]))
    assert (await client.post("/x")).status == 200


def _openssl(*args: str) -> None:
    import subprocess

    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


async def test_tls_with_client_certificates(tmp_path):
    import shutil
    import ssl

    import aiohttp
    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", str(d / f"{who}.key"),
                 "-out", str(d / f"{who}.csr"))
        ext = d / f"{who}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-out", str(d / f"{who}.crt"), "-extfile", str(ext))
    from pdsupervisor.local.ports import free_port

    rest = RestConfig(host="127.0.0.1", port=free_port(), tls_cert=str(d / "server.crt"),
                      tls_key=str(d / "server.key"), tls_client_ca=str(d / "ca.crt"))
    cfg = AgentConfig(name="n1", ip="127.0.0.1", state_dir=str(d / "state"), rest=rest, etcd=["127.0.0.1:1"])
    a = Agent(cfg)
    from agent.api.app import ssl_context

    runner = web.AppRunner(build_app(a))
    await runner.setup()
    await web.TCPSite(runner, rest.host, rest.port, ssl_context=ssl_context(rest)).start()
    try:
        url = f"https://127.0.0.1:{rest.port}/healthz"
        with_cert = ssl.create_default_context(cafile=str(d / "ca.crt"))
        with_cert.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
        async with aiohttp.ClientSession() as s:
            async with s.get(url, ssl=with_cert) as r:
                assert r.status == 200 and (await r.json())["ok"]
            no_cert = ssl.create_default_context(cafile=str(d / "ca.crt"))
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url, ssl=no_cert) as r:
                    await r.read()
        assert a.api_url.startswith("https://")
        # the CLI's client, with and without a client certificate
        base = f"https://127.0.0.1:{rest.port}"
        mtls = ApiClient(base, ca_file=str(d / "ca.crt"), cert_file=str(d / "client.crt"), key_file=str(d / "client.key"))
        assert (await mtls.request("GET", "/healthz"))["ok"]
        with pytest.raises(aiohttp.ClientError):
            await ApiClient(base, ca_file=str(d / "ca.crt")).request("GET", "/healthz")
    finally:
        await runner.cleanup()


async def test_client_reads_documents_and_says_when_an_answer_is_not_one(aiohttp_server):
    async def nodes(request: web.Request) -> web.Response:
        return web.json_response({"leader": "n1", "nodes": [{"name": "n1", "ip": "10.0.0.1"}]})

    async def html(request: web.Request) -> web.Response:  # e.g. a proxy in front of the agent
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.add_routes([web.get("/nodes", nodes), web.get("/cluster", html)])
    server = await aiohttp_server(app)
    client = ApiClient(str(server.make_url("/")))
    got = await client.nodes()
    assert isinstance(got, NodesDocument) and got.leader == "n1" and got.nodes[0].ip == "10.0.0.1"
    with pytest.raises(ApiError, match="HTTP 200: not a ClusterDocument document") as caught:
        await client.cluster()
    assert caught.value.status == 200 and caught.value.error is None
