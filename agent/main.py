"""`pd-agent`: the per-node daemon (`systemctl start pd-agent`).

Flags override the configuration file, so tests and the demo can run several agents on
one machine without any file. Exit status: 0 after SIGTERM/SIGINT (children left
running), 2 for a configuration error.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from typing import Any

import click

from agent.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_listen
from pdsupervisor.host.logsetup import _import_structlog_without_rich, configure_logging

structlog = _import_structlog_without_rich()


def overrides_from_flags(**flags: Any) -> dict[str, Any]:
    o: dict[str, Any] = {}
    for key in ("name", "ip", "cluster", "state_dir", "ttl", "sys_root", "accelerators"):
        if flags.get(key) is not None:
            o[key] = flags[key]
    if flags.get("etcd"):
        o["etcd"] = [e for item in flags["etcd"] for e in item.split(",") if e]
    if flags.get("listen"):
        host, port = parse_listen(flags["listen"])
        o["rest"] = {"port": port} if host is None else {"host": host, "port": port}
    if flags.get("token_file"):
        o.setdefault("rest", {})["token_file"] = flags["token_file"]
    boot: dict[str, Any] = {}
    if flags.get("bootstrap_etcd") is not None:
        boot["enabled"] = flags["bootstrap_etcd"]
    if flags.get("etcd_client_port"):
        boot["client_port"] = flags["etcd_client_port"]
    if flags.get("etcd_peer_port"):
        boot["peer_port"] = flags["etcd_peer_port"]
    if boot:
        o["bootstrap_etcd"] = boot
    if flags.get("label"):
        o["labels"] = dict(item.split("=", 1) for item in flags["label"])
    return o


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"YAML configuration (default: {DEFAULT_CONFIG_PATH} if it exists).")
@click.option("--name", help="Node name (default: hostname).")
@click.option("--ip", help="Advertise IP (default: first non-loopback IPv4).")
@click.option("--etcd", multiple=True, help="etcd endpoint host:port (repeat or comma-separate).")
@click.option("--cluster", help="Cluster name.")
@click.option("--listen", help="REST listen address host:port (default: 0.0.0.0:8470 with a token or client CA "
                                "configured, else 127.0.0.1:8470; another address needs a credential).")
@click.option("--state-dir", help="State directory (process records, logs, etcd data).")
@click.option("--bootstrap-etcd/--no-bootstrap-etcd", default=None, help="Start a one-member etcd here.")
@click.option("--etcd-client-port", type=int, help="Client port of the embedded etcd.")
@click.option("--etcd-peer-port", type=int, help="Peer port of the embedded etcd.")
@click.option("--ttl", type=int, help="Lease TTL in seconds.")
@click.option("--sys-root", help="Root for /sys, /proc and /dev probes.")
@click.option("--accelerators", type=int, help="Accelerator slots (default: probed).")
@click.option("--label", multiple=True, help="key=value node label (repeatable).")
@click.option("--token-file", help="Bearer token file: required on mutating REST endpoints and process logs.")
@click.option("--log-level", default="info", show_default=True)
def main(config_path: str | None, log_level: str, **flags: Any) -> None:
    """Run the pd-agent daemon."""
    configure_logging(log_level)
    if config_path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        config_path = DEFAULT_CONFIG_PATH
    try:
        config = load_config(config_path, overrides_from_flags(**flags))
    except (ConfigError, ValueError) as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    tune_gc()
    try:
        asyncio.run(_run(config))
    except ConfigError as exc:  # a file the configuration names (etcd credentials) cannot be used
        click.echo(str(exc), err=True)
        sys.exit(2)


GC_THRESHOLDS = (20_000, 20, 10)  # CPython's default is (700, 10, 10)


def tune_gc() -> None:
    """Collect the young generation after 20,000 allocations, not 700.

    The agent hosting the coordinator of a large cluster holds many long-lived objects (the
    decoded assignments and statuses: ~200,000 tracked at 1,024 nodes). Decoding a burst of
    them (a start's 1,024 assignments: 0.25 s instead of 0.5-1.0 s) or making `GET /cluster`'s
    rows allocates fast, and with the default threshold the collector runs so often, walking
    older generations, that it takes half of that CPU or more. Nothing here relies on prompt collection
    of cycles; garbage without cycles is freed by reference counting either way.
    """
    gc.set_threshold(*GC_THRESHOLDS)


async def _run(config: Any) -> None:
    from agent.daemon import Agent, install_signal_handlers

    agent = Agent(config)  # its parts and loops: `Agent.__init__` and `Agent.root_tasks`
    install_signal_handlers(agent)
    await agent.run()


if __name__ == "__main__":
    main()
