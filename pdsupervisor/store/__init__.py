"""The etcd layer: every etcd call (`etcd`), the cluster's records on top of it (`cluster`),
and where the etcd binary is (`embedded`)."""
