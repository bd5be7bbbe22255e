"""`GET /cluster` from the agent's cluster cache: one document per revision, read-your-writes."""

from __future__ import annotations

import asyncio

from agent.api.cluster import ClusterDocuments
from pdsupervisor.core.models import NodeFacts, NodeStatus
from pdsupervisor.core.spec import validate_spec
from pdsupervisor.store.cache import ClusterCache
from pdsupervisor.store.cluster import submit_spec
from pdsupervisor.store.etcd import Store
from tests.cluster_helpers import cluster_spec


async def test_concurrent_requests_share_one_document_per_revision(etcd_server):
    async with Store([etcd_server.endpoint], "docs-per-revision") as store:
        cache = ClusterCache(store)
        documents = ClusterDocuments(cache)
        try:
            lease = await store.grant_lease(30)
            await store.register_member(NodeFacts(name="n1", ip="127.0.0.1", lease=lease), lease)
            # submitted through this agent's store: the very next document has it
            spec = validate_spec(cluster_spec(store.cluster, etcd_server.endpoint, decode_nodes=["n2"]))
            assert (await submit_spec(store, spec)).status == 202
            docs = await asyncio.gather(*(documents.get() for _ in range(8)))
            assert documents.computed == 1 and all(d is docs[0] for d in docs)
            assert docs[0].generation == 1 and docs[0].phase == "pending"
            assert await documents.get() is docs[0]  # same revision: not made again
            await store.put_status(NodeStatus(node="n1", updated_at=1.0, lease=lease))
            again = await documents.get()
            assert documents.computed == 2 and again is not docs[0]
            await store.append_event("test", "an event shows in no document")  # it moves the revision
            assert await documents.get() is again and documents.computed == 2
            assert cache.revision == store.written_revision
        finally:
            await cache.close()
