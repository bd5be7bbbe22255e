"""pd-agent: the per-node daemon that makes its node match its assignment.

Everything that runs inside `pd-agent` lives here; it builds on `pdsupervisor` (the core,
the store, host probes) and nothing in `pdsupervisor` imports it.

- `main`: the `pd-agent` command: configuration, logging, then runs an `Agent`.
- `daemon`: `Agent`, the one asyncio loop: its parts built with what they share, its loops
  one named list (`root_tasks`), start order, shutdown.
- `config`: `AgentConfig` (etc/pdsupervisor/agent.yaml; flags override it).
- `lease`: `LeaseState`, the member lease shared by registration, reconciler and coordinator.
- `registration`: node facts under a lease refreshed every ttl/3.
- `reconciler`: assignment watch -> start/stop/restart; status written on change.
- `coordinator`: the cluster's reconcile loop, acting only while this agent leads.
- `notify`: sd_notify (READY, WATCHDOG, STATUS), no-op without NOTIFY_SOCKET.
- `process/`: local supervision, knowing nothing of etcd: `supervisor` (`ManagedProcess`:
  spawn, probe, backoff, stop), `child` (watching one pid; the readiness probe), `proctree`
  (kill a whole tree, never a stranger), `statefile` (records for adoption), `logs`
  (per-process files, rotation, tail/follow).
- `api/`: the REST app: `app` (node routes, auth middleware), `cluster` (the cluster routes
  every agent serves: writes are desired state, reads come from etcd).
"""
