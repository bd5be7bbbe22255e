"""etcd member health as shown (`GET /etcd`, `pdsupervisor status`), and when a replacement is safe."""

from __future__ import annotations

import pytest

from pdsupervisor.core.etcd_members import EtcdMember, member_document, quorum, replacement_problem


def _member(name: str, up: bool = True, leader: bool = False) -> EtcdMember:
    n = name[-1]
    return EtcdMember(name=name, id=f"a{n}", peer_urls=[f"http://127.0.0.{n}:2380"],
                      client_urls=[f"http://127.0.0.{n}:2379"], up=up, is_leader=leader,
                      db_size=3 * 2**20 // 2 if up else None, errors=[] if up else ["connection refused"])


def test_summary_names_the_leader_and_who_is_down():
    doc = member_document([_member("node3", up=False), _member("node1", leader=True), _member("node2")])
    assert [m.name for m in doc.members] == ["node1", "node2", "node3"]
    assert (doc.up, doc.quorum, doc.leader, doc.has_quorum) == (2, 2, "node1", True)
    assert doc.summary() == ("etcd: 2/3 members up, leader node1, db 1.5 MiB; down: node3 (connection refused)")


def test_no_leader_is_said_loudly():
    doc = member_document([_member("node1"), _member("node2", up=False), _member("node3", up=False)])
    assert not doc.has_quorum and "NO LEADER" in doc.summary()


@pytest.mark.parametrize(("down", "name", "url", "words"), [
    ({"node3"}, "node4", "http://127.0.0.4:2380", "no etcd member is named 'node4'"),
    ({"node3"}, "node2", "http://127.0.0.4:2380", "member node2 is up"),
    ({"node3"}, "node3", "http://127.0.0.2:2380", "already the peer URL of member node2"),
    ({"node2", "node3"}, "node3", "http://127.0.0.4:2380", "etcd has no quorum (1 of 3"),
    ({"node3"}, "node3", "http://127.0.0.4:2381", "give http://<its address>:2380"),  # the members' peer port
    ({"node3"}, "node3", "https://127.0.0.4:2380", "every other member's peer URL is http://<host>:2380"),
])
def test_unsafe_replacements_are_refused(down, name, url, words):
    members = [_member(f"node{i}", up=f"node{i}" not in down, leader=i == 1) for i in (1, 2, 3)]
    assert words in replacement_problem(member_document(members), name, url)


def test_a_new_name_of_another_member_is_refused():
    """The answer's member list (what the new member's agent starts with) would hold it twice."""
    doc = member_document([_member("node1", leader=True), _member("node2"), _member("node3", up=False)])
    assert "node2 is already the name of another etcd member" in replacement_problem(
        doc, "node3", "http://127.0.0.4:2380", "node2")
    assert replacement_problem(doc, "node3", "http://127.0.0.4:2380", "node3") is None
    assert replacement_problem(doc, "node3", "http://127.0.0.4:2380", "node4") is None


def test_a_dead_member_of_three_can_be_replaced_but_two_of_five_down_needs_care():
    three = member_document([_member("node1", leader=True), _member("node2"), _member("node3", up=False)])
    assert replacement_problem(three, "node3", "http://127.0.0.4:2380") is None
    five = member_document([_member(f"node{i}", up=i <= 3, leader=i == 1) for i in range(1, 6)])
    assert replacement_problem(five, "node5", "http://127.0.0.6:2380") is None  # 3 up of 4, then of 5: quorum 3
    four_of_four = member_document([_member(f"node{i}", up=i <= 2, leader=i == 1) for i in range(1, 5)])
    assert "no quorum (2 of 4" in replacement_problem(four_of_four, "node4", "http://127.0.0.7:2380")
    assert [quorum(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_a_replace_request_names_its_bad_field():
    from pydantic import ValidationError

    from pdsupervisor.core.etcd_members import ReplaceRequest

    for bad, field in (({"name": "", "peer_url": "http://h:1"}, "name"),
                       ({"name": "n", "peer_url": "h:2380"}, "peer_url"),
                       ({"name": "n", "peer_url": "http://h:2380,http://x:1"}, "peer_url"),
                       ({"name": "n", "peer_url": "http://h:2380", "new_name": "a=b"}, "new_name"),
                       ({"name": "n", "peer_url": "http://h:2380", "extra": 1}, "extra")):
        with pytest.raises(ValidationError) as e:
            ReplaceRequest.model_validate(bad)
        assert e.value.errors()[0]["loc"] == (field,)


def test_the_new_members_configuration_is_printed_with_hosts():
    import yaml

    from pdsupervisor.cli.etcd import new_member_config
    from pdsupervisor.core.etcd_members import MemberReplaced

    done = MemberReplaced(removed_id="a3", added_id="b4", name="node4", peer_url="https://10.0.0.4:2380",
                          members={"node1": "https://10.0.0.1:2380", "node4": "https://10.0.0.4:2380"})
    assert yaml.safe_load(new_member_config(done)) == {"bootstrap_etcd": {
        "members": {"node1": "10.0.0.1", "node4": "10.0.0.4"}, "initial_cluster_state": "existing"}}


def test_a_member_added_but_never_started_is_finished_first():
    """A member an earlier replacement added has no name until it starts: the member list handed
    to the next new member would hold it as `""`, so no second replacement meanwhile."""
    unstarted = EtcdMember(name="", id="a9", peer_urls=["http://127.0.0.9:2380"], client_urls=[], up=False,
                           is_leader=False, db_size=None, errors=["not started"])
    members = [_member(f"node{i}", up=i <= 3, leader=i == 1) for i in range(1, 5)]
    doc = member_document([*members, unstarted])
    assert doc.has_quorum
    assert "member a9 was added but has not started yet" in replacement_problem(doc, "node4", "http://127.0.0.6:2380")
    assert replacement_problem(member_document(members), "node4", "http://127.0.0.6:2380") is None
