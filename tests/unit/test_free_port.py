"""free_port: the ports the tests (and bench/agent_footprint.py) hand to agents, engines and proxies."""

from __future__ import annotations

from pdsupervisor.local.ports import BENCH_PORTS, MOONCAKE_RPC_PORTS, _can_bind, _ephemeral_range, free_port


def test_ports_are_distinct_free_and_outside_the_ranges_others_draw_from():
    low, high = _ephemeral_range()
    firsts = [free_port("127.0.0.1", span=2) for _ in range(300)]
    ports = [p for first in firsts for p in (first, first + 1)]
    assert len(set(ports)) == len(ports)  # never handed out twice, spans included
    assert not set(ports) & MOONCAKE_RPC_PORTS  # the transfer engine binds random ports there
    assert not set(ports) & BENCH_PORTS  # a benchmark may be running beside the tests
    assert not [p for p in ports if low <= p <= high]  # outgoing connections take these
    assert all(_can_bind("127.0.0.1", p) for p in ports)  # and each one can be listened on now
