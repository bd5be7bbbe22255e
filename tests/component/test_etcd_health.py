"""`GET /etcd`'s reading of a real etcd: a member up, then one that takes requests and never answers."""

from __future__ import annotations

import pytest

from pdsupervisor.store.etcd import Store, StoreUnavailable
from pdsupervisor.store.etcd_health import etcd_health
from tests.conftest import running_etcd


async def test_a_member_up_then_hung_says_why(tmp_path, cluster_name):
    with running_etcd(tmp_path) as etcd:
        async with Store([etcd.endpoint], cluster_name) as store:
            doc = await etcd_health(store, timeout_s=1.0)
            assert (doc.up, doc.quorum, doc.leader, len(doc.members)) == (1, 1, "test", 1)
            assert doc.members[0].db_size and doc.members[0].client_urls == [etcd.url]
            etcd.pause()  # accepts connections (the kernel does), answers nothing
            try:
                with pytest.raises(StoreUnavailable) as err:
                    await etcd_health(store, timeout_s=0.5)
            finally:
                etcd.resume()
    # the reason is said, not left blank (a timeout's own message is empty)
    reason = str(err.value).rpartition(f"{etcd.url}: ")[2]
    assert "Timeout" in reason, str(err.value)
