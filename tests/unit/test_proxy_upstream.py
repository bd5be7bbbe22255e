"""The proxy's HTTP/1.1 client to its engines, against raw servers on 127.0.0.1 that answer
as scripted: keep-alive, a connection the engine closed while idle, timeouts, broken answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pdsupervisor.local.ports import free_port
from pdsupervisor.proxy.upstream import ConnectError, UpstreamError, Upstreams

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    return head + await reader.readexactly(length)


def _run(script: Script, test: Callable[[Upstreams, str, list[int]], Awaitable[None]], **opts: float) -> list[int]:
    """Serve `script` (called per connection, with its number); run `test`; the connections' count."""
    conns: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        try:
            await script(reader, writer, len(conns) - 1)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def go() -> None:
        port = free_port()
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        settings = {"connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 10.0, "limit": 100, **opts}
        ups = Upstreams(connect_timeout=settings["connect_timeout"], read_timeout=settings["read_timeout"],
                        total_timeout=settings["total_timeout"], limit=int(settings["limit"]))
        try:
            await test(ups, f"127.0.0.1:{port}", conns)
        finally:
            await ups.close()
            server.close()

    asyncio.run(go())
    return conns


async def _post(ups: Upstreams, ep: str, body: bytes = b"{}") -> tuple[int, str, bytes]:
    conn = await ups.send(ep, "POST", "/v1/completions", body)
    try:
        return conn.status, conn.content_type, await conn.read()
    finally:
        ups.release(conn)


def test_connections_are_kept_alive_and_reused():
    async def serve(reader, writer, n):
        while True:
            req = await _request(reader)
            assert req.startswith(b"POST /v1/completions HTTP/1.1\r\n") and req.endswith(b"\r\n\r\n{}")
            writer.write(OK)

    async def test(ups, ep, conns):
        for _ in range(3):
            assert await _post(ups, ep) == (200, "application/json", b"{}")

    assert len(_run(serve, test)) == 1


def test_a_connection_the_engine_closed_while_idle_is_retried_once_on_a_new_one():
    """The engine closes a kept-alive connection just as it is reused: it never saw the request."""
    async def serve(reader, writer, n):
        await _request(reader)
        writer.write(OK)
        await writer.drain()
        if n == 0:
            await reader.read(1)  # the next request arrives: close without answering

    async def test(ups, ep, conns):
        assert (await _post(ups, ep))[0] == 200
        assert (await _post(ups, ep))[0] == 200

    assert len(_run(serve, test)) == 2


def test_a_new_connection_closed_before_the_answer_is_an_upstream_error():
    async def serve(reader, writer, n):
        await _request(reader)

    async def test(ups, ep, conns):
        with pytest.raises(UpstreamError, match="closed the connection"):
            await _post(ups, ep)

    assert len(_run(serve, test)) == 1


def test_refused_is_a_connect_error():
    async def test(ups, ep, conns):
        with pytest.raises(ConnectError, match="cannot connect"):
            await _post(ups, f"127.0.0.1:{free_port()}")

    _run(lambda r, w, n: asyncio.sleep(0), test)


def test_no_answer_is_a_timeout_and_bytes_keep_it_off():
    async def serve(reader, writer, n):
        await _request(reader)
        if n == 0:
            await asyncio.sleep(5)  # silent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # a byte every 0.1 s: slower than nothing, faster than the read timeout
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def test(ups, ep, conns):
        with pytest.raises(TimeoutError):
            await _post(ups, ep)
        status, ctype, body = await _post(ups, ep)
        assert (status, ctype, body) == (200, "text/event-stream", b"xxxxxx")

    _run(serve, test, read_timeout=0.3)


def test_the_total_time_bounds_an_answer_that_trickles():
    async def serve(reader, writer, n):
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            await asyncio.sleep(0.05)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()

    async def test(ups, ep, conns):
        conn = await ups.send(ep, "POST", "/", b"{}")
        try:
            with pytest.raises(TimeoutError):
                async for _ in conn.chunks():
                    pass
        finally:
            ups.release(conn)

    _run(serve, test, read_timeout=0.3, total_timeout=0.5)


def test_a_stream_broken_midway_gives_what_came_then_an_error():
    async def serve(reader, writer, n):
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()

    async def test(ups, ep, conns):
        conn = await ups.send(ep, "POST", "/", b"{}")
        got = []
        try:
            with pytest.raises(UpstreamError):
                async for chunk in conn.chunks():
                    got.append(chunk)
        finally:
            ups.release(conn)
        assert got == [b"abc"]

    _run(serve, test)


def test_a_body_without_length_ends_with_the_connection_and_malformed_http_is_an_error():
    async def serve(reader, writer, n):
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it" if n == 0 else b"NOT HTTP AT ALL\r\n\r\n")

    async def test(ups, ep, conns):
        assert await _post(ups, ep) == (200, "", b"all of it")
        with pytest.raises(UpstreamError, match="malformed"):
            await _post(ups, ep)

    assert len(_run(serve, test)) == 2


def test_at_most_limit_connections_the_others_wait_for_one():
    async def serve(reader, writer, n):
        while True:
            await _request(reader)
            await asyncio.sleep(0.05)
            writer.write(OK)

    async def test(ups, ep, conns):
        answers = await asyncio.gather(*(_post(ups, ep) for _ in range(6)))
        assert [a[0] for a in answers] == [200] * 6

    assert len(_run(serve, test, limit=2)) == 2
