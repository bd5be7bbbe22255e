"""pd-agent: the per-node daemon that makes its node match its assignment.

Modules, one concern each:

- `config`: `AgentConfig` (etc/pdsupervisor/agent.yaml; flags override it).
- `probes`: node facts read from /sys, /proc, /dev under a configurable root.
- `proctree`: kill a whole process tree, never a stranger (pid + start time since boot).
- `statefile`: the process records used for adoption (written with `pdsupervisor.atomic`).
- `logs`: per-process log files (direct O_APPEND fds, copy-truncate rotation, tail/follow).
- `supervisor`: `ManagedProcess`, one supervised process (spawn, probe, backoff, stop).
- `reconciler`: assignment watch -> start/stop/restart; status written on change.
- `registration`: node facts under a lease refreshed every ttl/3.
- `notify`: sd_notify (READY, WATCHDOG, STATUS), no-op without NOTIFY_SOCKET.
- `rest`: the local aiohttp API (`build_app`, `require_token`, `token_middleware`).
- `core`: `Agent`, the one asyncio loop tying these together (extension points for the
  coordinator are listed in its docstring).
- `main`: the `pd-agent` command.
"""
