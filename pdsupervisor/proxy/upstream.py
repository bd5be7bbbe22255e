"""The proxy's HTTP/1.1 client to its engines: keep-alive connections per endpoint, answers
parsed by httptools (llhttp, in C).

aiohttp's ClientSession cost about 250 us of CPU per exchange here (its request and response
objects, URL and header multidicts, a timer re-armed on every read, trace hooks), two thirds
of the proxy's CPU per request (each request is two exchanges: prefill and decode); one
exchange here costs about 50 us: one write (head and body together), the parser's callbacks,
one future and one timer per wait for the engine.

- **Connections** are kept per endpoint (last used first) and reused while the engine keeps
  them alive; at most `limit` open at once (others wait). An idle one is closed after
  `KEEPALIVE_S`. A kept-alive connection that closes before any byte of its answer came (the
  engine closed it while idle, just as it was reused) is retried once on a new connection:
  the engine never saw that request.
- **Errors**: no connection (refused, unreachable, connecting timed out) is `ConnectError`; the
  connection closing or breaking before the answer's end is `UpstreamError`. No byte from the
  engine for `read_timeout` (between reads), or the exchange outlasting `total_timeout`, is a
  `TimeoutError`.
- **Streams**: the body's pieces are handed over as they come; reading from the engine pauses
  while more than `HIGH_WATER` bytes wait for a slow client.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import cast

import httptools

KEEPALIVE_S = 30.0  # an idle connection is closed after this long
HIGH_WATER = 1 << 20  # bytes of an answer waiting for the client before reading pauses
LOW_WATER = HIGH_WATER // 4  # ... and resumes


class UpstreamError(Exception):
    """The exchange broke: the connection closed, or the answer was malformed, before its end."""


class ConnectError(UpstreamError):
    """No connection: refused, unreachable, or connecting timed out."""


class Conn(asyncio.Protocol):
    """One keep-alive connection to an engine, one exchange at a time: `Upstreams.send` sends
    the request and waits for the answer's head (`status`, `content_type`); then `read()` or
    `chunks()` gives its body; `Upstreams.release` takes the connection back."""

    def __init__(self, pool: Upstreams, endpoint: str) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reset(0.0)

    def _reset(self, deadline: float) -> None:
        self.status = 0
        self.content_type = ""
        self.head_done = False  # status and headers parsed
        self.complete = False  # the whole answer parsed
        self.keep_alive = False
        self.got_bytes = False  # any byte of the answer arrived
        self.error: BaseException | None = None
        self.deadline = deadline  # loop time the exchange must end by
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._fed = False  # bytes arrived since the read timer was armed
        self._framed = False  # the answer says where its body ends (Content-Length, chunks)
        self._until_close = False  # ... or not: it ends with the connection

    # ---- the exchange ---------------------------------------------------------------------

    def _send(self, data: bytes, body: bytes, deadline: float) -> None:
        assert self.transport is not None
        self._reset(deadline)
        if len(body) < 65536:
            self.transport.write(data + body)
        else:
            self.transport.writelines((data, body))

    async def _wait_head(self) -> None:
        while not self.head_done:
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            await self._wait()
        body = self._body
        return body[0] if len(body) == 1 else b"".join(body)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they come; an `UpstreamError` if it breaks before its end."""
        body = self._body
        while True:
            if body:
                chunk = body.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                yield chunk
            elif self.complete:
                return
            else:
                await self._wait()

    async def _wait(self) -> None:
        """Until the engine sends something (or fails, or the time is up)."""
        if self.error is not None:
            raise self.error
        fut = self._waiter = self.loop.create_future()
        self._fed = False
        timer = self.loop.call_at(min(self.loop.time() + self.pool.read_timeout, self.deadline), self._timer, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def _timer(self, fut: asyncio.Future[None]) -> None:
        if fut.done():
            return
        now = self.loop.time()
        if self._fed and now < self.deadline:  # bytes came meanwhile: read_timeout runs from the last
            self._fed = False
            self.loop.call_at(min(now + self.pool.read_timeout, self.deadline), self._timer, fut)
            return
        what = "the exchange's total time" if now >= self.deadline else "no answer for the read timeout"
        fut.set_exception(TimeoutError(f"{self.endpoint}: {what}"))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    # ---- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._fed = self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"{self.endpoint} answered malformed HTTP: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        self._wake()

    def eof_received(self) -> bool:
        return False  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool._lost(self)
        if self._until_close and self.head_done:
            self.complete = True
            self._wake()
        elif not self.complete:
            self._fail(UpstreamError(f"{self.endpoint} closed the connection{f': {exc}' if exc else ''}"))

    # ---- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-type":
            self.content_type = value.decode("latin-1")
        elif lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self._framed and self.status not in (204, 304):
            self._until_close = True
            self.keep_alive = False
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True


class Upstreams:
    """The connection pool to the engines (see the module's docstring)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, total_timeout: float, limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout, self.read_timeout, self.total_timeout = connect_timeout, read_timeout, total_timeout
        self.limit = limit
        self._idle: dict[str, list[Conn]] = {}
        self._heads: dict[tuple[str, str, str], bytes] = {}
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False
        self._sweeper = self.loop.call_later(KEEPALIVE_S, self._sweep)

    async def send(self, endpoint: str, method: str, path: str, body: bytes = b"") -> Conn:
        """Send the request (JSON `body`) and wait for the answer's head; the caller reads the
        body and gives the connection back with `release`, whatever happens."""
        key = (endpoint, method, path)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = (f"{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\n"
                                       "Content-Type: application/json\r\nContent-Length: ").encode()
        data = head + b"%d\r\n\r\n" % len(body)
        deadline = self.loop.time() + self.total_timeout
        conn = await self._take(endpoint)
        try:
            conn._send(data, body, deadline)
            await conn._wait_head()
        except UpstreamError:
            self.release(conn)
            if not conn.reused or conn.got_bytes:
                raise
            conn = await self._connect(endpoint)  # the engine had closed it while idle: once more
            try:
                conn._send(data, body, deadline)
                await conn._wait_head()
            except BaseException:
                self.release(conn)
                raise
        except BaseException:
            self.release(conn)
            raise
        return conn

    def release(self, conn: Conn) -> None:
        """Back to the pool when its answer was read whole and the engine keeps it alive; else closed."""
        if conn.closed:
            return
        if conn.complete and conn.keep_alive and not conn.error and not self._closing and conn.transport is not None:
            if conn._paused:
                conn.transport.resume_reading()
            conn.reused = True
            conn.idle_since = self.loop.time()
            self._idle.setdefault(conn.endpoint, []).append(conn)
            self._wake_one()
        elif conn.transport is not None:
            conn.transport.close()  # connection_lost counts it out

    async def close(self) -> None:
        self._closing = True
        self._sweeper.cancel()
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let connection_lost run

    # ---- connections --------------------------------------------------------------------------

    async def _take(self, endpoint: str) -> Conn:
        idle = self._idle.get(endpoint)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return await self._connect(endpoint)

    async def _connect(self, endpoint: str) -> Conn:
        while self._open >= self.limit:
            fut = self.loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            idle = self._idle.get(endpoint)
            if idle:
                return await self._take(endpoint)
        host, _, port = endpoint.rpartition(":")
        conn = Conn(self, endpoint)
        self._open += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(lambda: conn, host.strip("[]"), int(port))
        except TimeoutError:
            self._dropped()
            raise ConnectError(f"connecting to {endpoint} timed out ({self.connect_timeout:g}s)") from None
        except OSError as exc:
            self._dropped()
            raise ConnectError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
        except BaseException:
            self._dropped()
            raise
        return conn

    def _lost(self, conn: Conn) -> None:
        idle = self._idle.get(conn.endpoint)
        if idle and conn in idle:
            idle.remove(conn)
        self._dropped()

    def _dropped(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _sweep(self) -> None:
        """Close the connections idle for KEEPALIVE_S."""
        old = self.loop.time() - KEEPALIVE_S
        for conns in self._idle.values():
            for conn in [c for c in conns if c.idle_since < old]:
                if conn.transport is not None:
                    conn.transport.close()
        self._sweeper = self.loop.call_later(KEEPALIVE_S, self._sweep)
