"""The coordinator's loop against a real etcd: leadership survives a failed cycle, and a
decision never overwrites a stop that arrived while it was being made."""

from __future__ import annotations

from agent.coordinator import Coordinator
from agent.lease import LeaseState
from pdsupervisor.core.cluster_view import desired_state
from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.store.cluster import observe, read_record, request_stop, submit_spec
from pdsupervisor.store.etcd import Store
from tests.cluster_helpers import cluster_spec


async def test_a_failed_cycle_does_not_wedge_leadership(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        coord = Coordinator(store, "a", LeaseState(5))
        await coord.cycle()
        assert coord.is_leader and await store.leader() == "a"
        coord._step_down()  # what a StoreUnavailable in a cycle does
        await coord.cycle()
        assert coord.is_leader  # took its own key back instead of waiting on itself forever
        other = Coordinator(store, "b", LeaseState(5))
        await other.cycle()
        assert not other.is_leader and await store.leader() == "a"
        await store.revoke_lease(coord.lease)


async def test_a_stop_during_a_cycle_is_not_overwritten(etcd_server, cluster_name):
    async with Store([etcd_server.endpoint], cluster_name) as store:
        lease = await store.grant_lease(10)
        for i, name in enumerate(("n1", "n2"), start=1):
            await store.register_member(NodeFacts(name=name, ip=f"127.0.0.{i}"), lease)
        spec = validate_spec(cluster_spec(cluster_name, etcd_server.endpoint, decode_nodes=["n2"]))
        assert (await submit_spec(store, spec)).status == 202
        coord = Coordinator(store, "a", LeaseState(5))
        assert await coord._hold_leadership()
        obs = await observe(store)
        desired = desired_state(obs)
        assert desired.record is not None and desired.record != obs.record  # it wants to write the record
        assert (await request_stop(store)).status == 202  # the user stops meanwhile
        await coord._apply(obs, desired)
        record, _ = await read_record(store)
        assert record is not None and record.action == "stop"
        assert await store.assignments() == {}  # nothing from the stale decision was written
        assert coord.is_leader
        await store.revoke_lease(lease)
        await store.revoke_lease(coord.lease)


async def test_events_are_trimmed_by_a_cycle_that_writes_no_assignment(etcd_server, cluster_name):
    """A crash loop adds events every backoff while no assignment changes: the log is trimmed anyway."""
    async with Store([etcd_server.endpoint], cluster_name) as store:
        for i in range(6):
            await store.append_event("process", f"restart {i}")
        coord = Coordinator(store, "a", LeaseState(5), events_kept=3)
        await coord.cycle()  # no spec: nothing to assign, one `leader` event added
        events = await store.events(limit=100)
        assert [e["kind"] for e in events] == ["process", "process", "leader"]
        await store.revoke_lease(coord.lease)
