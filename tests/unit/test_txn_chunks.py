"""How a leader write is cut into etcd transactions, and how a refusal for size is told."""

from __future__ import annotations

import pytest

from pdsupervisor.store.gateway import op_chunks, too_large


def _ops(count: int, size: int = 10) -> list[tuple[str, bytes | None]]:
    return [(f"k{i:03d}", b"v" * size) for i in range(count)]


def test_chunks_keep_the_order_and_respect_the_op_count():
    ops = _ops(300) + [("gone", None)]
    chunks = op_chunks(ops, max_ops=64, max_bytes=1 << 20)
    assert [len(c) for c in chunks] == [64, 64, 64, 64, 45]
    assert [op for c in chunks for op in c] == ops  # the first op (the spec record) goes first


def test_chunks_respect_the_bytes_and_a_larger_op_goes_alone():
    ops = _ops(10, size=96)  # 100 bytes each, key included
    assert [len(c) for c in op_chunks(ops, max_ops=64, max_bytes=300)] == [3, 3, 3, 1]
    big = [("a", b"x" * 10), ("huge", b"x" * 1000), ("b", b"x" * 10)]
    assert op_chunks(big, max_ops=64, max_bytes=100) == [[big[0]], [big[1]], [big[2]]]


def test_no_ops_no_chunks_and_bad_limits_are_named():
    assert op_chunks([], max_ops=64, max_bytes=100) == []
    with pytest.raises(ValueError, match="max_ops and max_bytes must be positive"):
        op_chunks(_ops(1), max_ops=0, max_bytes=100)


@pytest.mark.parametrize(("error", "large"), [
    ("etcdserver: too many operations in txn request", True),
    ("etcdserver: request is too large", True),
    ("grpc: received message larger than max (2363560 vs. 2097152)", True),
    ("etcdserver: requested lease not found", False),
    ("etcdserver: mvcc: required revision has been compacted", False),
])
def test_a_refusal_for_size_is_told_from_other_errors(error, large):
    assert too_large(error) is large
