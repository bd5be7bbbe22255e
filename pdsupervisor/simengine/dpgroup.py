"""The simulated engine as one rank of a vLLM data-parallel group (DP size > 1).

Real decode engines in a DP group (DeepSeek DP+EP across nodes) run collectives every
step: they meet at the DP master address before serving; when one rank dies the others'
next collective fails (gloo: peer closed) or hangs (NCCL, until its timeout); and a rank
restarted alone cannot rejoin, because the survivors' communicators were built once, for
the group that formed. The simulator breaks the same way, over a protocol of its own:
one TCP connection per member to rank 0, newline-delimited JSON.

- Rank 0 listens on the DP master address:port (as torch's TCPStore server does) before
  the model "loads"; it cannot start when that address is taken or not its own. Ranks > 0
  connect to it, retrying while it is not up, and join with their rank and DP size. Once
  all `size` ranks are there (rank 0 counts itself) the group forms: rank 0 hands every
  member the formation's generation. Until then the engine is not ready: /health,
  /v1/models and completions answer 503 saying what it waits for.
- Heartbeats go both ways every HEARTBEAT_S; a connection closed, or silent for
  HEARTBEAT_TIMEOUT_S, is a rank gone (EOF finds a killed process at once, the timeout a
  frozen or cut-off one). Before the group formed that is harmless: rank 0 forgets the
  member, a member whose rank 0 went away connects again. Once formed it breaks the group
  for good: rank 0 tells the other members which rank left, a member that loses rank 0
  says rank 0 left. A broken rank answers 503 (`DP group broken: rank 2 left`), fails its
  requests in flight and never recovers by itself: like a real rank it must be restarted,
  with its whole group. (A real API server also exits ~5 s after its engine died unless
  VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is set; the simulator stays up, so the reason can be read.)
- A rank that reaches a rank 0 whose group already formed (a rank restarted alone, or a
  new rank of a restarting group that came up before the old rank 0 was stopped) is
  refused, and its process exits with status 1 (`DP group already formed (generation X);
  restart the whole group`); rank 0's group is left as it is. That is vLLM's outcome: the
  newcomer's rendezvous with a group that already formed fails, and the engine dies in
  start-up; the survivors keep the process group that formed (in practice already broken
  by the death that called for the restart), and neither heals. Its supervisor starts it
  again: once the old rank 0 is gone and a new one listens, it joins the new group.
  Rank 0 does not break over it: a stray process must not take down a group that serves.
  A rank whose DP size differs from rank 0's, or one already there, is refused alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from typing import Any

from pdsupervisor.aio.serve import stop_tasks
from pdsupervisor.aio.wait import wait_event
from pdsupervisor.simengine.config import DPSettings

log = logging.getLogger("pdsupervisor.simengine")

REFUSED_EXIT = 1  # the exit status of a rank refused by rank 0
HEARTBEAT_S = 0.5
HEARTBEAT_TIMEOUT_S = 2.0
RETRY_S = 0.25  # between a member's attempts to reach rank 0
CONNECT_TIMEOUT_S = 2.0

WAITING, FORMED, BROKEN, REFUSED = "waiting", "formed", "broken", "refused"


class DPGroupError(RuntimeError):
    """Rank 0 cannot listen on the DP master address: the engine cannot start."""


class GroupBroken(Exception):
    """The group is broken under a request in flight; the message says why."""


class _Link:
    """A member's connection to rank 0, at either end: JSON lines, heartbeats both ways."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._beat = asyncio.create_task(self._heartbeat())

    def send(self, **msg: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\n")

    async def recv(self) -> dict[str, Any] | None:
        """The next message that is not a heartbeat; None once the peer is gone (closed, or silent too long)."""
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_TIMEOUT_S):
                    line = await self.reader.readline()
                msg = json.loads(line)
            except (TimeoutError, OSError, ValueError):  # an empty line (EOF) is a ValueError too
                return None
            if not isinstance(msg, dict):
                return None
            if msg.get("op") != "hb":
                return msg

    async def _heartbeat(self) -> None:
        while not self.writer.is_closing():
            self.send(op="hb")
            await asyncio.sleep(HEARTBEAT_S)

    def close(self) -> None:
        self._beat.cancel()
        self.writer.close()


class DPGroup:
    """This engine's rank in its DP group: `ready` once the group formed, until it breaks."""

    def __init__(self, dp: DPSettings) -> None:
        self.dp = dp
        self.state = WAITING
        self.generation: str | None = None
        self._members: dict[int, _Link] = {}  # rank 0: the members that joined
        self.reason = self._waiting()
        self._broken = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        return self.state == FORMED

    def view(self) -> dict[str, Any]:
        return {"rank": self.dp.rank, "size": self.dp.size, "master": self.dp.master, "state": self.state,
                "generation": self.generation, "reason": self.reason}

    async def start(self) -> None:
        """Rank 0: listen for the members (DPGroupError if it cannot); a member: start reaching rank 0."""
        log.info("%s", self.reason)
        if self.dp.rank > 0:
            task = asyncio.create_task(self._member())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            self._server = await asyncio.start_server(self._serve_member, self.dp.master_ip, self.dp.master_port)
        except OSError as exc:
            raise DPGroupError(f"DP rank 0 cannot listen on the DP master address {self.dp.master}: {exc}") from exc

    async def stop(self) -> None:
        """Leave the group (the others see this rank go): close every connection."""
        if self._server is not None:
            self._server.close()
        for link in self._members.values():
            link.close()
        await stop_tasks(self._tasks, "the DP group's connections", log)

    async def step(self, seconds: float) -> None:
        """`seconds` of work that needs every rank (a step's collectives): GroupBroken when the
        group is broken, or breaks meanwhile. Arms no timer for 0 s."""
        if seconds > 0 and self.ready:
            await wait_event(self._broken, seconds)
        if not self.ready:
            raise GroupBroken(self.reason)

    # ---- rank 0 -----------------------------------------------------------------------

    async def _serve_member(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(reader, writer)
        try:
            hello = await link.recv()
            if hello is None or hello.get("op") != "join":
                return
            rank = hello.get("rank")
            refusal = self._refusal(rank, hello.get("size"))
            if refusal is not None:
                log.error("refusing DP rank %s from %s: %s", rank, writer.get_extra_info("peername"), refusal)
                link.send(op="refuse", reason=refusal)
                return
            assert isinstance(rank, int)
            self._members[rank] = link
            log.info("DP rank %d joined (%d/%d ranks)", rank, len(self._members) + 1, self.dp.size)
            if len(self._members) + 1 == self.dp.size:
                self._form()
            else:
                self.reason = self._waiting()
            await link.recv()  # a member sends only heartbeats: this returns once it is gone
            self._left(rank, link)
        finally:
            link.close()
            self._tasks.discard(task)

    def _refusal(self, rank: Any, size: Any) -> str | None:
        if self.state in (FORMED, BROKEN):
            return f"DP group already formed (generation {self.generation}); restart the whole group"
        if size != self.dp.size:
            return f"DP size mismatch: rank 0 has DP size {self.dp.size}, rank {rank} has {size}"
        if not isinstance(rank, int) or not 0 < rank < self.dp.size:
            return f"DP rank {rank!r} is not in 1..{self.dp.size - 1}"
        if rank in self._members:
            return f"DP rank {rank} already joined"
        return None

    def _form(self) -> None:
        generation = uuid.uuid4().hex[:8]
        for link in self._members.values():
            link.send(op="formed", generation=generation)
        self._formed(generation)

    def _left(self, rank: int, link: _Link) -> None:
        if self._members.get(rank) is not link:  # the group broke already and let it go
            return
        del self._members[rank]
        if self.state == WAITING:
            self.reason = self._waiting()
            log.warning("DP rank %d left before the group formed (%d/%d ranks)", rank, len(self._members) + 1,
                        self.dp.size)
        else:
            self._break(f"rank {rank} left")

    def _waiting(self) -> str:
        joined = f" ({len(self._members) + 1}/{self.dp.size} ranks)" if self.dp.rank == 0 else ""
        return f"DP rank {self.dp.rank}/{self.dp.size}: waiting for the group at {self.dp.master}{joined}"

    # ---- a member (rank > 0) ------------------------------------------------------------

    async def _member(self) -> None:
        """Reach rank 0 and join, then follow the group until it breaks or this rank is refused."""
        while True:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(self.dp.master_ip, self.dp.master_port)
            except (OSError, TimeoutError):
                await asyncio.sleep(RETRY_S)
                continue
            link = _Link(reader, writer)
            link.send(op="join", rank=self.dp.rank, size=self.dp.size)
            try:
                while (msg := await link.recv()) is not None:
                    op = msg.get("op")
                    if op == "formed" and self.state == WAITING:
                        self._formed(str(msg.get("generation")))
                    elif op == "broken":
                        self._break(str(msg.get("reason")))
                        return
                    elif op == "refuse":
                        self.state, self.reason = REFUSED, str(msg.get("reason"))
                        log.error("DP rank %d/%d refused by rank 0 at %s: %s; exiting, as a real rank whose "
                                  "rendezvous failed", self.dp.rank, self.dp.size, self.dp.master, self.reason)
                        logging.shutdown()
                        os._exit(REFUSED_EXIT)
            finally:
                link.close()
            if self.state == FORMED:
                self._break("rank 0 left")
                return
            log.warning("DP rank 0 at %s went away before the group formed; waiting for it again", self.dp.master)
            await asyncio.sleep(RETRY_S)

    # ---- either -------------------------------------------------------------------------

    def _formed(self, generation: str) -> None:
        self.state, self.generation, self.reason = FORMED, generation, ""
        log.info("DP group formed (%d ranks, generation %s)", self.dp.size, generation)

    def _break(self, why: str) -> None:
        """For good. Rank 0 tells every member left why."""
        if self.state == BROKEN:
            return
        self.state, self.reason = BROKEN, f"DP group broken: {why}"
        log.error("%s", self.reason)
        self._broken.set()
        for link in self._members.values():
            link.send(op="broken", reason=why)
            link.close()
        self._members.clear()
