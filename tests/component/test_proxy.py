"""The proxy in front of simulated engines: real processes, real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import openai
import pytest

from tests.conftest import until
from tests.pdproc import http, metric, wait_for


def _pd(procs, n_pre=1, n_dec=2, *engine_args, proxy_args=()):
    pres = [procs.engine("prefill", *engine_args)[0] for _ in range(n_pre)]
    decs = [procs.engine("decode", *engine_args)[0] for _ in range(n_dec)]
    base, _ = procs.proxy("--prefill", *pres, "--decode", *decs, *proxy_args)
    return base, pres, decs


def test_completions_and_chat_stream_and_not(procs):
    base, pres, decs = _pd(procs, 2, 2)
    for _ in range(4):
        status, body = http("POST", base + "/v1/completions", {"prompt": "a b c", "max_tokens": 3})
        out = json.loads(body)
        assert status == 200 and out["choices"][0]["text"] == " t0 t1 t2" and out["usage"]["prompt_tokens"] == 3
    status, body = http("POST", base + "/v1/completions", {"prompt": "a b", "max_tokens": 4, "stream": True})
    events = [e for e in body.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == " t0 t1 t2 t3"
    status, body = http("POST", base + "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    assert status == 200 and body.decode().rstrip().endswith("data: [DONE]")
    status, body = http("POST", base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == " t0 t1"
    # every decode received the prefill's kv_transfer_params; load spread over both of each role
    hits = [metric(f"http://{d}", "vllm:sim_kv_transfer_hits_total") for d in decs]
    assert sum(hits) == 7 and all(hits)
    assert sum(metric(f"http://{d}", "vllm:sim_decode_local_prefills_total") for d in decs) == 0
    assert all(metric(f"http://{p}", "vllm:request_success_total") for p in pres)
    assert metric(base, "pdproxy_requests_total") == 7


def test_openai_client(procs):
    base, _, _ = _pd(procs, 1, 1)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="sim-model", prompt="hello world", max_tokens=5, extra_body={"ignore_eos": True})
    assert out.choices[0].text == " t0 t1 t2 t3 t4" and out.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.content == " t0 t1 t2"
    stream = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == " t0 t1 t2"
    assert client.models.list().data[0].id == "sim-model"


def test_errors_are_openai_shaped(procs, tmp_path):
    from pdsupervisor.local.ports import free_port

    dead = f"127.0.0.1:{free_port()}"
    dec, _ = procs.engine("decode")
    base, _ = procs.proxy("--prefill", dead, "--decode", dec, "--probe-interval", "3600")  # requests find it dead
    status, body = http("POST", base + "/v1/completions", b"{oops")
    assert status == 400 and json.loads(body)["error"]["type"] == "BadRequestError"
    status, body = http("POST", base + "/v1/completions", {"prompt": "x"})
    assert status == 502 and json.loads(body)["error"]["code"] == 502  # the only prefill refused: ejected
    status, body = http("POST", base + "/v1/completions", {"prompt": "x"})
    assert status == 503 and "prefill" in json.loads(body)["error"]["message"]
    assert json.loads(http("GET", base + "/status")[1])["ejected"] == [dead]
    assert http("GET", base + "/health")[0] == 503
    text = http("GET", base + "/metrics")[1].decode()  # what the "no instances of a role" alert reads
    assert 'pdproxy_available_instances{role="prefill"} 0.0' in text
    assert 'pdproxy_available_instances{role="decode"} 1.0' in text


def test_ejected_instance_is_probed_back(procs):
    from pdsupervisor.local.ports import free_port

    pre, _ = procs.engine("prefill")
    port = free_port()
    base, _ = procs.proxy("--prefill", pre, "--decode", f"127.0.0.1:{port}")
    assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] in (502, 503)  # found dead by it, or by a probe
    wait_for(lambda: json.loads(http("GET", base + "/status")[1])["ejected"], timeout=10, what="the decode ejected")
    procs.engine("decode", port=port)
    wait_for(lambda: not json.loads(http("GET", base + "/status")[1])["ejected"], timeout=10, what="probe back in")
    assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200


def test_black_holed_instance_is_ejected_and_the_request_retried(procs, black_hole):
    """A node that drops SYNs (full accept queue) costs one connect timeout, once."""
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode")
    black = black_hole
    base, _ = procs.proxy("--prefill", pre, "--decode", black, dec, "--connect-timeout", "0.5",
                          "--round-robin")
    answers = [http("POST", base + "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] for _ in range(4)]
    assert answers == [200] * 4
    status = json.loads(http("GET", base + "/status")[1])
    assert black in json.dumps(status["ejected"])


def test_api_key(procs, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("s3cret\n")
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode")
    base, _ = procs.proxy("--prefill", pre, "--decode", dec, "--api-key-file", str(keyfile))
    assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 401
    assert http("POST", base + "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer wrong"})[0] == 401
    assert http("POST", base + "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer s3cret"})[0] == 200
    assert http("POST", base + "/v1/completions", {"prompt": "x"}, {"x-api-key": "s3cret"})[0] == 200


def test_benchmark_mode_fans_out(procs):
    base, _, decs = _pd(procs, 1, 2, proxy_args=("--benchmark_mode", "--repeat_d_times", "3"))
    status, body = http("POST", base + "/v1/completions", {"prompt": "a b", "max_tokens": 2, "stream": True})
    assert status == 200 and body.count(b"data: [DONE]") == 1
    # an engine counts a request just after its last byte: wait for the count, then check it
    counts = wait_for(lambda: (c := [metric(f"http://{d}", "vllm:request_success_total") for d in decs])
                      and sum(c) >= 4 and c, timeout=5, what="4 decode requests counted")
    assert counts == [2, 2]


def test_generator_on_p_node(procs):
    base, _, _ = _pd(procs, 1, 1, proxy_args=("--generator-on-p-node",))
    status, body = http("POST", base + "/v1/completions", {"prompt": "a b", "max_tokens": 3, "stream": True})
    events = [json.loads(e[6:]) for e in body.decode().split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == " t0 t1 t2"
    assert events[0]["id"] != events[1]["id"]  # first token from the prefill engine, the rest from decode


def test_prefix_policy_sends_a_shared_prefix_to_the_prefill_that_has_it(procs):
    base, pres, _ = _pd(procs, 3, 1, proxy_args=("--policy", "prefix"))
    system = " ".join(f"rule{i}" for i in range(300))  # 300 tokens for the engines, 2,000 characters for the proxy

    def served() -> list[float]:
        return [metric(f"http://{p}", "vllm:request_success_total") for p in pres]

    for question in ("what is a?", "and b?"):
        status, _ = http("POST", base + "/v1/completions", {"prompt": f"{system} {question}", "max_tokens": 2})
        assert status == 200
    counts = served()
    assert sorted(counts) == [0, 0, 2], counts  # under `load` the idle ones would have had one each
    holder = pres[counts.index(2)]
    assert metric(f"http://{holder}", "vllm:prefix_cache_hits_total") == 288  # 18 of the 19 blocks of 16 tokens
    # a chat with a long system message: its own holder, chosen by load, then kept
    chat = [{"role": "system", "content": system.upper()}]
    for question in ("hi", "hello again"):
        body = {"messages": [*chat, {"role": "user", "content": question}], "max_tokens": 2, "stream": True}
        assert http("POST", base + "/v1/chat/completions", body)[0] == 200
    after = [n - c for n, c in zip(served(), counts, strict=True)]
    assert sorted(after) == [0, 0, 2] and after != counts, after
    text = http("GET", base + "/metrics")[1].decode()
    assert 'pdproxy_prefix_routed_total{outcome="hit"} 2.0' in text
    assert 'pdproxy_prefix_routed_total{outcome="miss"} 2.0' in text


def test_client_disconnect_cancels_upstream(procs):
    base, _, decs = _pd(procs, 1, 1, "--sim-tpot", "0.05")

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            long_stream = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with s.post(base + "/v1/completions", json=long_stream) as r:
                await r.content.readline()
                assert metric(f"http://{decs[0]}", "vllm:num_requests_running") == 1

    asyncio.run(go())
    wait_for(lambda: metric(f"http://{decs[0]}", "vllm:num_requests_running") == 0, timeout=5, what="decode to stop")
    assert metric(f"http://{decs[0]}", "vllm:generation_tokens_total") < 500


def test_clients_gone_mid_stream_eject_nothing(procs):
    """Clients hanging up while their long streams are written: the write fails on their
    closed connection, which is nobody's fault upstream (no failure counted, nothing ejected)."""
    base, _, decs = _pd(procs, 1, 1)

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
        body = json.dumps({"prompt": "x", "max_tokens": 512, "ignore_eos": True, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await reader.read(100)
        writer.close()

    async def go() -> None:
        for _ in range(3):
            await asyncio.gather(*(one() for _ in range(32)))

    asyncio.run(go())
    assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200
    status = json.loads(http("GET", base + "/status")[1])
    assert [(i["failures"], i["ejected"]) for i in status["instances"]] == [(0, False), (0, False)]


def test_decode_killed_under_load_loses_nothing_unstarted(procs):
    pre, _ = procs.engine("prefill")
    dec1, p1 = procs.engine("decode", "--sim-tpot", "0.01")
    dec2, _ = procs.engine("decode", "--sim-tpot", "0.01")
    base, _ = procs.proxy("--prefill", pre, "--decode", dec1, dec2)
    results: list[tuple[bool, int, bool]] = []  # (stream, status, complete)

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        stream = i % 2 == 1
        body = {"prompt": f"p {i}", "max_tokens": 20, "ignore_eos": True, "stream": stream}
        async with s.post(base + "/v1/completions", json=body) as r:
            body = await r.read()
            results.append((stream, r.status, b"[DONE]" in body if stream else b"t19" in body))

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            sem = asyncio.Semaphore(16)

            async def bounded(i: int) -> None:
                async with sem:
                    await one(s, i)

            tasks = [asyncio.create_task(bounded(i)) for i in range(160)]
            await until(lambda: len(results) >= 30, 30, what="30 answers before the kill", interval=0.01)
            os.kill(p1.pid, signal.SIGKILL)
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(go())
    assert len(results) == 160
    # Nothing had been sent for a non-streamed request: each one is retried and completes.
    assert all(status == 200 and complete for stream, status, complete in results if not stream)
    # Only streams already under way on the killed engine may be cut short (at most one per slot).
    assert all(status == 200 for _, status, _ in results)
    assert sum(1 for stream, _, complete in results if stream and not complete) <= 8
    st = json.loads(http("GET", base + "/status")[1])
    assert dec1 in st["ejected"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_an_empty_200_is_one_failed_exchange_retried_elsewhere(role):
    """Counted once, as a failure (not also as ok), retried elsewhere; `served` counts successes only."""
    from aiohttp import web
    from prometheus_client.parser import text_string_to_metric_families

    from pdsupervisor.aio.serve import start_site
    from pdsupervisor.local.ports import free_port
    from pdsupervisor.proxy.instances import Registry
    from pdsupervisor.proxy.server import PDProxy, ProxyConfig

    async def prefill(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "t0"}], "kv_transfer_params": {"k": 1}})

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=200, body=b"", content_type="application/json")

    async def decode(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": " t0 t1"}]})

    async def healthy(request: web.Request) -> web.Response:
        return web.Response()

    def samples(text: str, name: str, **labels: str) -> list[float]:
        return [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    async def go() -> None:
        runners = []
        eps = {}
        for name, handler in (("pre", prefill), ("bad", empty), ("dec", decode)):
            app = web.Application()
            app.router.add_post("/v1/completions", handler)
            if name != "bad":  # the prober keeps those in rotation, and "bad" out of it
                app.router.add_get("/health", healthy)
            port = free_port()
            runners.append(await start_site(app, "127.0.0.1", port))
            eps[name] = f"127.0.0.1:{port}"
        registry = Registry()
        # ties go to the first: the empty one
        registry.set_endpoints("prefill", [eps["bad"], eps["pre"]] if role == "prefill" else [eps["pre"]])
        registry.set_endpoints("decode", [eps["bad"], eps["dec"]] if role == "decode" else [eps["dec"]])
        port = free_port()
        runners.append(await start_site(PDProxy(ProxyConfig(port=port), registry).app(), "127.0.0.1", port))
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
                    assert r.status == 200 and (await r.json())["choices"][0]["text"] == " t0 t1"
                async with s.get(base + "/metrics") as r:
                    text = await r.text()
                async with s.get(base + "/status") as r:
                    status = await r.json()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
        bad = {"role": role, "instance": eps["bad"]}
        good = eps["pre"] if role == "prefill" else eps["dec"]
        assert samples(text, "pdproxy_upstream_requests_total", outcome="ok", **bad) == []
        assert samples(text, "pdproxy_upstream_requests_total", outcome="conn_error", **bad) == [1.0]
        assert samples(text, "pdproxy_upstream_latency_seconds_count", **bad) == [1.0]
        assert samples(text, "pdproxy_upstream_requests_total", outcome="ok", role=role, instance=good) == [1.0]
        served = {i["endpoint"]: (i["served"], i["failures"]) for i in status["instances"]}
        assert served == {eps["pre"]: (1, 0), eps["bad"]: (0, 1), eps["dec"]: (1, 0)}
        assert status["ejected"] == [eps["bad"]]

    asyncio.run(go())


def test_sigterm_stops_the_proxy_at_once(procs):
    """The agent stops the proxy with SIGTERM: its cleanup contexts run (the upstream session
    holds a keep-alive connection to each engine) and it exits 0 at once."""
    pre, _ = procs.engine("prefill")
    dec, _ = procs.engine("decode")
    base, p = procs.proxy("--prefill", pre, "--decode", dec)
    assert http("POST", base + "/v1/completions", {"prompt": "x"})[0] == 200
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0, procs.log(p)
    assert "Traceback" not in procs.log(p), procs.log(p)


def test_probes_eject_the_dead_at_once_and_the_silent_after_two_misses():
    """Every instance in rotation is probed: refused or not 200 ejects at once; no answer only
    twice in a row (a busy engine may miss one); an ejected one answering 200 is back."""
    from aiohttp import web

    from pdsupervisor.aio.serve import start_site
    from pdsupervisor.local.ports import free_port
    from pdsupervisor.proxy.instances import Registry
    from pdsupervisor.proxy.server import PDProxy, ProxyConfig

    busy = {"calls": 0, "hang": 0}  # "hang": how many of its next probes it leaves unanswered

    async def busy_health(request: web.Request) -> web.Response:
        busy["calls"] += 1
        if busy["hang"] > 0:
            busy["hang"] -= 1
            await asyncio.sleep(60)  # the probe gives up first (the handler is cancelled then)
        return web.Response()

    async def sick_health(request: web.Request) -> web.Response:
        return web.Response(status=503)

    async def well_health(request: web.Request) -> web.Response:
        return web.Response()

    async def go() -> None:
        runners, eps = [], {"refused": f"127.0.0.1:{free_port()}"}
        for name, handler in (("busy", busy_health), ("sick", sick_health), ("well", well_health)):
            app = web.Application()
            app.router.add_get("/health", handler)
            port = free_port()
            runners.append(await start_site(app, "127.0.0.1", port))
            eps[name] = f"127.0.0.1:{port}"
        registry = Registry()
        registry.set_endpoints("decode", eps.values())
        inst = {i.endpoint: i for i in registry.instances()}
        busy_inst = inst[eps["busy"]]
        proxy = PDProxy(ProxyConfig(probe_interval_s=0.05, probe_timeout_s=0.5), registry)
        port = free_port()
        runners.append(await start_site(proxy.app(), "127.0.0.1", port))
        try:
            await until(lambda: inst[eps["refused"]].ejected and inst[eps["sick"]].ejected, 10, what="refused, sick out")
            assert inst[eps["refused"]].ejected_reason.startswith("probe: Cannot connect")
            assert inst[eps["sick"]].ejected_reason == "probe: /health answered 503"

            busy["hang"] = 1
            calls = busy["calls"]
            await until(lambda: busy["calls"] >= calls + 3, 10, what="a miss, then answers")
            assert not busy_inst.ejected and busy_inst.probe_misses == 0

            busy["hang"] = 10**6
            await until(lambda: busy_inst.ejected, 10, what="busy out after two misses")
            assert busy_inst.ejected_reason.startswith("probe: no answer 2 times in a row")
            busy["hang"] = 0
            await until(lambda: not busy_inst.ejected, 10, what="busy back in rotation")
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
        assert not inst[eps["well"]].ejected and inst[eps["well"]].failures == 0
        for reason in ("probe_unreachable", "probe_status", "probe_no_answer"):
            assert f'pdproxy_ejections_total{{reason="{reason}",role="decode"}} 1.0' in text, reason

    asyncio.run(go())
