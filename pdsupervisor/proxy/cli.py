"""`pdsupervisor proxy` / `python -m pdsupervisor.proxy`.

Accepts the seed's spelling too: `--prefill a:1 b:2` (several values after one flag),
repeated flags, and underscore forms such as `--generator_on_p_node`.
"""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from pdsupervisor.aio.serve import run_app
from pdsupervisor.core.models import EtcdAccess, TlsFiles
from pdsupervisor.host.logsetup import configure_logging
from pdsupervisor.proxy.config import DEFAULT_MAX_BODY_BYTES
from pdsupervisor.proxy.instances import POLICIES, Registry
from pdsupervisor.proxy.server import PROXY, PDProxy, ProxyConfig
from pdsupervisor.proxy.workers import WORKER, Worker, supervise, worker_duties
from pdsupervisor.store.transport import Credentials, CredentialsError, credentials

log = logging.getLogger("pdsupervisor.proxy")

_LIST_FLAGS = ("--prefill", "--decode")


class _SeedArgs(click.Command):
    """Turns `--prefill a b` into `--prefill a --prefill b` and `--x_y` into `--x-y` before click parses."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        current: str | None = None  # a list flag whose values we are reading
        first = False
        for tok in args:
            if tok.startswith("--"):
                name, eq, val = tok.partition("=")
                name = "--" + name[2:].replace("_", "-")
                out.append(name + eq + val)
                current = name if name in _LIST_FLAGS and not eq else None
                first = current is not None
            elif current is not None and not first:
                out.extend([current, tok])
            else:
                out.append(tok)
                first = False
        ctx.meta["proxy_args"] = list(out)  # (click consumes `out`) what `--workers` starts each worker with
        return super().parse_args(ctx, out)


def _split(values: tuple[str, ...]) -> list[str]:
    return [v for item in values for v in item.replace(",", " ").split()]


@click.command("proxy", cls=_SeedArgs, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8868, show_default=True, type=int)
@click.option("--model", default=None, hidden=True, help="Accepted for the seed's argv; the engines name the model.")
@click.option("--prefill", multiple=True, help="Prefill instance host:port (repeatable, or several after one flag).")
@click.option("--decode", multiple=True, help="Decode instance host:port (repeatable, or several after one flag).")
@click.option("--cluster", default=None, help="Read instances live from etcd for this cluster.")
@click.option("--etcd", default=None, help="etcd endpoints host:port[,host:port] (with --cluster).")
@click.option("--etcd-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA bundle etcd's certificate is checked against (endpoints are then https).")
@click.option("--etcd-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Client certificate shown to etcd (with --etcd-key).")
@click.option("--etcd-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--etcd-user", default=None, help="etcd RBAC user (with --etcd-password-file).")
@click.option("--etcd-password-file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--routing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --cluster: keep the last routing here; used at start while etcd is away.")
@click.option("--policy", type=click.Choice(POLICIES), default="load", show_default=True,
              help="load: prefill by prompt tokens in flight, decode by requests in flight; round-robin: in turn; "
                   "prefix: prefill to the instance that last got the prompt's longest prefix unless it is too busy "
                   "(then by load), decode by load.")
@click.option("--round-robin", "round_robin", is_flag=True, help="Same as --policy round-robin.")
@click.option("--generator-on-p-node", "generator_on_p", is_flag=True, help="First token comes from the prefill node.")
@click.option("--benchmark-mode", is_flag=True, help="Fan each prompt out to extra decode requests.")
@click.option("--repeat-d-times", default=0, show_default=True, type=int)
@click.option("--repeat-p-request", default=1, type=click.IntRange(1, 1), hidden=True,
              help="Accepted for the seed; only 1 is supported.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File with accepted API keys, one a line.")
@click.option("--max-body-bytes", default=DEFAULT_MAX_BODY_BYTES, show_default=True, type=click.IntRange(min=1),
              help="Largest request body accepted; a larger one is refused (413) before any engine sees it.")
@click.option("--connect-timeout", default=10.0, show_default=True, type=float,
              help="Seconds to connect upstream; a timeout ejects the instance and retries elsewhere.")
@click.option("--read-timeout", default=1200.0, show_default=True, type=float)
@click.option("--total-timeout", default=6 * 3600.0, show_default=True, type=float)
@click.option("--probe-interval", default=0.5, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds between health probes of every instance (GET /health).")
@click.option("--probe-timeout", default=1.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds a probe waits for its answer; two unanswered in a row eject the instance.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Proxy processes serving the port (SO_REUSEPORT), each with its own membership, probes and "
                   "balancing; this process supervises them (see pdsupervisor/proxy/workers.py).")
@click.option("--worker-index", type=click.IntRange(min=0), default=None, hidden=True)
@click.option("--worker-dir", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
@click.option("--worker-parent", type=int, default=None, hidden=True)
@click.option("--log-level", default="INFO", show_default=True)
def proxy(**opts: Any) -> None:
    """Prefill/decode proxy: OpenAI-compatible, live membership, ejection and retry."""
    configure_logging(opts["log_level"])
    prefill, decode = _split(opts["prefill"]), _split(opts["decode"])
    if opts["cluster"] and (prefill or decode):
        raise click.UsageError("use either --cluster/--etcd or --prefill/--decode, not both")
    if opts["cluster"] and not opts["etcd"]:
        raise click.UsageError("--cluster needs --etcd")
    if not opts["cluster"] and not (prefill and decode):
        raise click.UsageError("give --prefill and --decode instances, or --cluster and --etcd")
    keys: list[str] = []
    if opts["api_key_file"]:
        keys = [k.strip() for k in Path(opts["api_key_file"]).read_text().splitlines() if k.strip()]
        if not keys:
            raise click.UsageError("--api-key-file holds no key")
    cfg = ProxyConfig(
        host=opts["host"], port=opts["port"], generator_on_p=opts["generator_on_p"],
        benchmark_mode=opts["benchmark_mode"], repeat_d_times=opts["repeat_d_times"], api_keys=keys,
        connect_timeout_s=opts["connect_timeout"], read_timeout_s=opts["read_timeout"],
        total_timeout_s=opts["total_timeout"], probe_interval_s=opts["probe_interval"], probe_timeout_s=opts["probe_timeout"],
        max_body_bytes=opts["max_body_bytes"],
    )
    registry = Registry(policy="round-robin" if opts["round_robin"] else opts["policy"])
    registry.set_endpoints("prefill", prefill)
    registry.set_endpoints("decode", decode)
    etcd = opts["etcd"].split(",") if opts["cluster"] else None
    access = _etcd_access(opts)
    try:
        tls, auth = credentials(access)
    except CredentialsError as exc:
        raise click.UsageError(str(exc)) from None
    index = opts["worker_index"]
    if opts["workers"] > 1 and index is None:
        sys.exit(supervise(click.get_current_context().meta["proxy_args"], opts["workers"]))
    app = build_app(cfg, registry, cluster=opts["cluster"], etcd=etcd, routing_cache=opts["routing_cache"],
                    etcd_tls=tls, etcd_auth=auth)
    proxy_ = app[PROXY]
    if index is not None and opts["worker_dir"] is not None and opts["worker_parent"] is not None:
        app[WORKER] = Worker(index, opts["worker_dir"], opts["worker_parent"], proxy_.metrics)
        app.cleanup_ctx.append(worker_duties)
    who = f"proxy worker {index}" if index is not None else "proxy"
    run_app(app, cfg.host, cfg.port, reuse_port=index is not None,
            on_listening=lambda: log.info("%s listening on %s:%d (%s)", who, cfg.host, cfg.port, proxy_.source))


def _etcd_access(opts: dict[str, Any]) -> EtcdAccess | None:
    files = (opts["etcd_ca"], opts["etcd_cert"], opts["etcd_key"])
    if any(files) and not all(files):
        raise click.UsageError("--etcd-ca, --etcd-cert and --etcd-key go together")
    if bool(opts["etcd_user"]) != bool(opts["etcd_password_file"]):
        raise click.UsageError("--etcd-user and --etcd-password-file go together")
    if not (any(files) or opts["etcd_user"]):
        return None
    tls = TlsFiles(ca_file=files[0], cert_file=files[1], key_file=files[2]) if all(files) else None
    return EtcdAccess(tls=tls, username=opts["etcd_user"], password_file=opts["etcd_password_file"])


def build_app(cfg: ProxyConfig, registry: Registry, *, cluster: str | None = None, etcd: list[str] | None = None,
              routing_cache: Path | None = None, etcd_tls: ssl.SSLContext | None = None,
              etcd_auth: Credentials | None = None) -> web.Application:
    """The proxy's app; with `cluster` and `etcd`, its membership comes live from etcd (over
    TLS with `etcd_tls`, as an RBAC user with `etcd_auth`)."""
    if not (cluster and etcd):
        return PDProxy(cfg, registry).app()
    from pdsupervisor.proxy.etcd_source import MEMBERSHIP, EtcdSource, membership
    from pdsupervisor.store.etcd import Store

    app = PDProxy(cfg, registry, source=f"etcd:{cluster}").app()
    app[MEMBERSHIP] = EtcdSource(Store(etcd, cluster, tls=etcd_tls, auth=etcd_auth), registry, routing_cache)
    app.cleanup_ctx.append(membership)
    return app


if __name__ == "__main__":
    proxy(sys.argv[1:])
