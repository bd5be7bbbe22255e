"""The simulated engine as a rank of a DP group: real processes, one loopback address per "node".

The group forms only once every rank met rank 0; a rank gone breaks the others for good
(in-flight streams too), a rank restarted alone is refused, the whole group restarted forms
again. DP settings come from vLLM's flags or else from VLLM_DP_*.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from http.client import HTTPConnection, IncompleteRead

import pytest

from pdsupervisor.simengine.config import ConfigError, parse_args
from pdsupervisor.simengine.dpgroup import HEARTBEAT_TIMEOUT_S, REFUSED_EXIT
from tests.pdproc import Procs, free_port, http, wait_for

START_S = 20  # a sim engine's start, on a busy 2-core machine


class Group:
    """The ranks of one DP group, rank r listening on 127.0.0.(r+2); rank 0's address is the master."""

    def __init__(self, procs: Procs, size: int, *, flags: bool = False, env: dict[str, str] | None = None) -> None:
        self.procs, self.size, self.flags, self.env = procs, size, flags, env or {}
        self.master = ("127.0.0.2", free_port("127.0.0.2"))
        self.master_addr = f"{self.master[0]}:{self.master[1]}"
        self.endpoints = [(f"127.0.0.{r + 2}", free_port(f"127.0.0.{r + 2}")) for r in range(size)]
        self.p: list[subprocess.Popen[bytes] | None] = [None] * size

    def start(self, rank: int, *extra: str, size: int | None = None) -> subprocess.Popen[bytes]:
        host, port = self.endpoints[rank]
        size = size or self.size
        argv = ["--model", "sim-model", "--host", host, "--port", str(port), *extra]
        env = dict(self.env)
        if self.flags:
            argv += ["--data-parallel-size", str(size), "--data-parallel-rank", str(rank),
                     "--data-parallel-address", self.master[0], "--data-parallel-rpc-port", str(self.master[1])]
        else:
            env.update(VLLM_DP_SIZE=str(size), VLLM_DP_RANK=str(rank), VLLM_DP_RANK_LOCAL="0",
                       VLLM_DP_MASTER_IP=self.master[0], VLLM_DP_MASTER_PORT=str(self.master[1]))
        p = self.p[rank] = self.procs.start("pdsupervisor.simengine", argv, env=env, name=f"rank{rank}")
        return p

    def kill(self, rank: int) -> None:
        p = self.p[rank]
        assert p is not None
        p.kill()
        p.wait(5)

    def url(self, rank: int, path: str) -> str:
        host, port = self.endpoints[rank]
        return f"http://{host}:{port}{path}"

    def health(self, rank: int) -> tuple[int, str]:
        status, body = http("GET", self.url(rank, "/health"), timeout=2)
        return status, body.decode()

    def dp(self, rank: int) -> dict:
        status, body = http("GET", self.url(rank, "/debug/dp"), timeout=2)
        assert status == 200, (status, body)
        return json.loads(body)

    def log(self, rank: int) -> str:
        p = self.p[rank]
        assert p is not None
        return self.procs.log(p)

    def wait_health(self, rank: int, status: int, says: str = "", timeout: float = START_S) -> None:
        """Until rank's /health answers `status` with `says` in its body; fails at once if the rank exits."""
        seen: list[tuple[int, str]] = []

        def check() -> bool:
            p = self.p[rank]
            assert p is not None and p.poll() is None, f"rank {rank} exited:\n{self.log(rank)}"
            seen[:] = [self.health(rank)]
            return seen[0][0] == status and says in seen[0][1]

        try:
            wait_for(check, timeout, what=f"rank {rank} /health {status} {says!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {seen}\n{self.log(rank)}") from None

    def wait_formed(self, timeout: float = START_S) -> str:
        """Until every rank is healthy; the generation they all share."""
        for rank in range(self.size):
            self.wait_health(rank, 200, timeout=timeout)
        generations = {self.dp(rank)["generation"] for rank in range(self.size)}
        assert len(generations) == 1 and None not in generations, generations
        return generations.pop()

    def complete(self, rank: int) -> tuple[int, bytes]:
        return http("POST", self.url(rank, "/v1/completions"), {"prompt": "x", "max_tokens": 2})


def test_a_group_forms_only_once_every_rank_is_up(procs):
    group = Group(procs, 3)
    group.start(0)
    group.start(1)
    # rank 1 joined and rank 0 counts 2 of 3: the group waits for the third, it is not merely slow
    group.wait_health(0, 503, f"DP rank 0/3: waiting for the group at {group.master_addr} (2/3 ranks)")
    group.wait_health(1, 503, f"DP rank 1/3: waiting for the group at {group.master_addr}")
    status, body = group.complete(1)
    assert status == 503 and b"waiting for the group" in body
    assert http("GET", group.url(0, "/v1/models"))[0] == 503

    # the third rank "loads" first: the group forms once it is up
    group.start(2, "--sim-load-time", "1")
    generation = group.wait_formed()
    assert group.complete(2)[0] == 200 and http("GET", group.url(0, "/v1/models"))[0] == 200
    assert f"DP rank 1/3: waiting for the group at {group.master_addr}" in group.log(1)
    assert all(f"DP group formed (3 ranks, generation {generation})" in group.log(r) for r in range(3))


def test_a_rank_killed_breaks_the_others_and_their_streams_for_good(procs):
    group = Group(procs, 3)
    for rank in range(3):
        group.start(rank, "--sim-tpot", "0.1")
    generation = group.wait_formed()

    # a stream in flight on rank 0 (100 tokens, 10 s) when rank 1 dies
    host, port = group.endpoints[0]
    conn = HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 100, "ignore_eos": True,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    group.kill(1)
    with pytest.raises(IncompleteRead) as cut:  # the stream ends abruptly, without [DONE]
        resp.read()
    conn.close()
    assert b"DP group broken: rank 1 left" in cut.value.partial and b"[DONE]" not in cut.value.partial

    for rank in (0, 2):  # rank 2 learns it from rank 0
        group.wait_health(rank, 503, "DP group broken: rank 1 left", timeout=5)
        assert group.complete(rank)[0] == 503
        assert "DP group broken: rank 1 left" in group.log(rank)

    # rank 1 restarted alone is refused: it exits (as a real rank whose rendezvous failed), and
    # the others stay broken
    lone = group.start(1, "--sim-tpot", "0.1")
    assert lone.wait(START_S) == REFUSED_EXIT
    assert f"DP group already formed (generation {generation}); restart the whole group" in group.log(1)
    for rank in (0, 2):
        assert group.health(rank) == (503, "DP group broken: rank 1 left")

    # the whole group restarted forms again, as a new generation
    for rank in range(3):
        group.kill(rank)
    for rank in range(3):
        group.start(rank)
    assert group.wait_formed() != generation


def test_a_frozen_rank_0_is_lost_by_heartbeat_and_never_taken_back(procs):
    group = Group(procs, 2)
    group.start(0)
    group.start(1)
    group.wait_formed()
    p0 = group.p[0]
    assert p0 is not None
    p0.send_signal(signal.SIGSTOP)  # its connections stay open: only the missing heartbeats tell
    try:
        group.wait_health(1, 503, "DP group broken: rank 0 left", timeout=HEARTBEAT_TIMEOUT_S + 5)
    finally:
        p0.send_signal(signal.SIGCONT)
    # rank 0 wakes up to a group whose member left: broken too, not healed
    group.wait_health(0, 503, "DP group broken: rank 1 left", timeout=HEARTBEAT_TIMEOUT_S + 5)


def test_upstream_flags_win_over_the_env_and_a_size_mismatch_is_refused(procs):
    # the env names a group of 4 elsewhere: with --data-parallel-size > 1 vLLM reads only the flags
    group = Group(procs, 2, flags=True, env={"VLLM_DP_SIZE": "4", "VLLM_DP_RANK": "3",
                                             "VLLM_DP_MASTER_IP": "127.0.0.9", "VLLM_DP_MASTER_PORT": "1"})
    group.start(0)
    mismatched = group.start(1, size=3)
    assert mismatched.wait(START_S) == REFUSED_EXIT
    assert "DP size mismatch: rank 0 has DP size 2, rank 1 has 3" in group.log(1)
    group.wait_health(0, 503, "(1/2 ranks)")  # rank 0's group is unaffected: still waiting
    group.start(1)
    group.wait_formed()
    view = group.dp(1)
    assert (view["rank"], view["size"], view["master"]) == (1, 2, group.master_addr)
    cfg = json.loads(http("GET", group.url(1, "/debug/config"))[1])
    assert cfg["dp"] == {"size": 2, "rank": 1, "master": group.master_addr, "source": "flags"}


def test_dp_size_1_is_no_group(procs):
    for extra, env in ((["--data-parallel-size", "1"], None), ([], {"VLLM_DP_SIZE": "1", "VLLM_DP_RANK": "0"})):
        ep, _ = procs.engine(None, *extra, env=env)  # healthy on its own
        assert http("GET", f"http://{ep}/debug/dp") == (200, b"null")
        assert json.loads(http("GET", f"http://{ep}/debug/config")[1])["dp"] is None


def test_rank_0_that_cannot_listen_on_the_master_address_exits(procs):
    group = Group(procs, 2)
    with socket.socket() as taken:
        taken.bind(group.master)
        taken.listen()
        p = group.start(0)
        assert p.wait(timeout=START_S) != 0
    assert f"DP rank 0 cannot listen on the DP master address {group.master_addr}" in group.log(0)


def test_dp_settings_from_flags_or_env():
    env = {"VLLM_DP_SIZE": "4", "VLLM_DP_RANK": "2", "VLLM_DP_MASTER_IP": "10.0.0.2", "VLLM_DP_MASTER_PORT": "25940"}
    dp = parse_args([], env=env).dp
    assert dp is not None and (dp.size, dp.rank, dp.master, dp.source) == (4, 2, "10.0.0.2:25940", "env")
    # flags (and vLLM's short forms), all of them or none: the env is not mixed in
    dp = parse_args(["-dp", "8", "-dpr", "4", "-dpl", "4", "-dpa", "10.0.0.9"], env=env).dp
    assert dp is not None and (dp.size, dp.rank, dp.master, dp.source) == (8, 4, "10.0.0.9:29550", "flags")
    dp = parse_args(["--data-parallel-size=2", "--data-parallel-rank=1", "--data-parallel-rpc-port=7000"]).dp
    assert dp is not None and (dp.size, dp.rank, dp.master) == (2, 1, "127.0.0.1:7000")
    assert parse_args(["--data-parallel-size", "1"], env=env).dp == parse_args([], env=env).dp  # size 1: the env
    assert parse_args([], env={}).dp is None
    with pytest.raises(ConfigError, match="DP rank 4 is not in 0..3"):
        parse_args([], env={**env, "VLLM_DP_RANK": "4"})
    with pytest.raises(ConfigError, match="VLLM_DP_MASTER_PORT: DP size 4 needs the DP master port"):
        parse_args([], env={k: v for k, v in env.items() if k != "VLLM_DP_MASTER_PORT"})
    with pytest.raises(ConfigError, match="bad VLLM_DP_"):
        parse_args([], env={**env, "VLLM_DP_SIZE": "four"})
