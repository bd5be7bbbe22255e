"""`pdsupervisor demo`: a whole PD cluster on this machine, from nothing, in one command.

A CA and every node's certificates (in the state dir), etcd with TLS and client-certificate
auth (started by node1's agent), three agents on 127.0.0.1-127.0.0.3, simulated engines,
the real `mooncake_master` when it runs here, the built-in proxy. Ctrl-C or SIGTERM stops it all
in order and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import click
import yaml
from rich.console import Console
from rich.markup import escape

from pdsupervisor.api.client import DEFAULT_API, ApiError
from pdsupervisor.cli.cluster import console as make_console
from pdsupervisor.cli.cluster import etcd_line, status_table, wait_for_phase
from pdsupervisor.cli.doctor import port_check
from pdsupervisor.cli.specfile import read_spec
from pdsupervisor.core.spec import ClusterSpec, load_spec
from pdsupervisor.host.private import open_lock, private_dir
from pdsupervisor.local.cluster import DEMO_STATE_DIR, BootError, LocalCluster
from pdsupervisor.store.embedded import etcd_binary

REPO_DEMO_SPEC = Path(__file__).resolve().parents[2] / "etc" / "pdsupervisor" / "demo.yaml"


def _name(p: Any) -> str:
    try:
        return str(p.name())
    except Exception:
        return "?"


def _take_lock(state_dir: Path) -> Any:
    """The demo's state dir (ours, 0700) and its lock, neither reachable through a symlink
    someone else planted (the default lives in /tmp)."""
    try:
        private_dir(state_dir)
        fd = open_lock(state_dir / "demo.lock")
    except OSError as exc:  # UnsafePath included
        raise click.ClickException(f"cannot use the state directory {state_dir}: {exc}; pass another --state-dir") from None
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise click.ClickException(
            f"a demo is already running (pid {holder}, state in {state_dir}); stop it with Ctrl-C "
            f"or `kill {holder}`, or use it: pdsupervisor status"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


LOADER_ERROR = "error while loading shared libraries"


def master_cannot_run(binary: str, timeout_s: float = 15.0) -> str | None:
    """Why the Mooncake master `binary` (found on PATH, as the agents find it) cannot run here,
    or None when it can. Found is not enough: pip's mooncake_master without Debian's libibverbs1
    is there and exits 127 at once, so it is run (`--help`: prints its flags, binds nothing)."""
    path = shutil.which(binary)
    if path is None:
        return f"{binary} not installed (pip install mooncake-transfer-engine-non-cuda; it needs Debian's libibverbs1)"
    try:
        out = subprocess.run([path, "--help"], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"`{path} --help` did not finish in {timeout_s:g}s"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    lines = [line.strip() for line in (out.stderr + out.stdout).decode(errors="replace").splitlines() if line.strip()]
    loader = next((line for line in lines if LOADER_ERROR in line), None)
    if loader:
        return loader
    if out.returncode < 0:
        sig = -out.returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return f"`{path} --help` was killed by {name}"
    if out.returncode in (126, 127):
        what = "not executable" if out.returncode == 126 else "not found or a shared library missing"
        return f"{path} exited with {out.returncode} ({what})" + (f": {lines[0]}" if lines else "")
    return None  # it ran (gflags' --help exits 1 after printing the flags)


def _demo_spec(spec_path: Path, console: Console, etcd_members: int) -> tuple[ClusterSpec, str]:
    """The validated spec and the text to submit: the file's, or without a Mooncake master
    when it cannot run here (not installed, or a shared library missing), saying why; with
    several etcd members, every member as the engines' and proxy's etcd endpoints."""
    spec = read_spec(spec_path)  # invalid: exit 2, as plan, doctor and start
    reason = master_cannot_run(spec.mooncake.binary) if spec.mooncake.enabled else None
    if reason is None and etcd_members == 1:
        return spec, spec_path.read_text()
    doc = yaml.safe_load(spec_path.read_text())
    if reason is not None:
        console.print(f"[yellow]running without a Mooncake master: {escape(reason)}[/]", soft_wrap=True)
        doc.setdefault("mooncake", {})["enabled"] = False
    if etcd_members > 1 and not spec.etcd.endpoints:
        doc.setdefault("etcd", {})["endpoints"] = [f"127.0.0.{i + 1}:{spec.etcd.client_port}"
                                                   for i in range(etcd_members)]
    text = yaml.safe_dump(doc, sort_keys=False)
    return load_spec(text), text


def _refuse_taken_ports(spec: ClusterSpec, lc: LocalCluster) -> None:
    """A port the demo's processes need that is taken stops the demo before it starts."""
    ports = port_check(lc.ports_needed(spec))
    if ports.status != "OK":
        raise click.ClickException(f"ports already in use: {ports.found} (another etcd or demo?)")


async def _one_completion(proxy_url: str, model: str) -> str:
    """The text of one completion through the proxy; a failure stops the demo, saying why."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(f"{proxy_url}/v1/completions",
                                json={"model": model, "prompt": "The capital of France is", "max_tokens": 12}) as resp:
            body = await resp.text()
    try:
        return str(json.loads(body)["choices"][0]["text"])
    except (ValueError, LookupError, TypeError):
        raise click.ClickException(f"the completion through the proxy failed: HTTP {resp.status}: {body[:300]}") from None


async def _run_demo(lc: LocalCluster, spec_text: str, model: str, timeout: float, console: Console, stop: asyncio.Event,
                    exit_when_ready: bool) -> None:
    client = lc.client()
    started = time.monotonic()
    etcd = "etcd" if lc.etcd_members == 1 else f"an etcd of {lc.etcd_members} members"
    console.print(f"starting {etcd} and {len(lc.agents)} agents (logs in {lc.root}) ...")
    try:
        await lc.boot(timeout)
    except BootError as exc:
        raise click.ClickException(str(exc)) from None
    answer = await client.start(spec_text)
    console.print(f"submitted {lc.cluster} spec: generation {answer.generation}")
    doc = await wait_for_phase(client, "ready", timeout, lambda line: console.print(f"  {line}"))
    console.print(f"[green]ready[/] in {time.monotonic() - started:.1f}s\n")
    if doc.proxy_url is None:  # ready means the proxy is assigned: not expected
        raise click.ClickException("the cluster is ready but GET /cluster names no proxy URL")
    text = await _one_completion(doc.proxy_url, model)
    console.print(f"one completion through the proxy: [bold]{text!r}[/]\n")
    status_table(await client.cluster(), console)
    console.print(await etcd_line(client))
    api = lc.agents[0].api_url
    # node1 is on the CLI's default API; another one (a changed LocalCluster) is said
    export_api = "" if api == DEFAULT_API else f"PDSUPERVISOR_API={api} "
    admin = lc.client_files()
    console.print(f"""
The cluster is yours until Ctrl-C:
  curl -s {doc.proxy_url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'
  pdsupervisor status    # reads need no token: status, nodes, events
  export {export_api}PDSUPERVISOR_TOKEN_FILE={lc.token_file}    # writes and logs do
  pdsupervisor logs node2 decode-0
  logs: {lc.root}/<node>/logs/  (agents: {lc.root}/<node>/agent.log)
etcd speaks TLS and wants a client certificate of the demo's CA ({lc.pki_dir}); e.g. the admin one:
  {etcd_binary("etcdctl")} --endpoints {",".join(lc.etcd_endpoints)} --cacert {admin.ca_file} \\
       --cert {admin.cert_file} --key {admin.key_file} get --prefix /pdsupervisor/{lc.cluster}/members/ --keys-only
""", soft_wrap=True)
    if not exit_when_ready:
        await stop.wait()


async def _shutdown(lc: LocalCluster, console: Console) -> None:
    client = lc.client()
    console.print("\nstopping the cluster in order (proxy, engines, master) ...")
    try:
        await client.stop()
        await wait_for_phase(client, "stopped", 60, lambda line: console.print(f"  {line}"))
    except (OSError, ApiError, TimeoutError) as exc:
        console.print(f"[yellow]ordered stop incomplete ({exc}); killing what is left[/]")


@click.command("demo")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path), default=REPO_DEMO_SPEC,
              show_default=True, help="Cluster spec to run.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEMO_STATE_DIR, show_default=True)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for ready.")
@click.option("--exit-when-ready", is_flag=True, help="Stop everything once a completion went through (CI).")
@click.option("--etcd-members", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="3: an etcd member on each node (kill one: nothing changes), else node1's one-member etcd.")
def demo_command(spec_path: Path, state_dir: Path, timeout: float, exit_when_ready: bool, etcd_members: str) -> None:
    """Run a local 3-node PD cluster until Ctrl-C."""
    console = make_console()
    if not spec_path.exists():
        raise click.ClickException(f"{spec_path}: no such spec (run from a checkout, or pass --spec)")
    lock = _take_lock(state_dir)
    spec, spec_text = _demo_spec(spec_path, console, int(etcd_members))
    # node1's agent starts etcd where the spec (and so the plan) has it; with 3 members every agent one
    lc = LocalCluster(cluster=spec.cluster, root=state_dir / "run", etcd_port=spec.etcd.client_port,
                      etcd_peer_port=spec.etcd.peer_port, tls=True, token=True, etcd_members=int(etcd_members))
    _refuse_taken_ports(spec, lc)
    if lc.root.exists():
        shutil.rmtree(lc.root)  # a fresh etcd, CA and process records each run
    lc.make_pki()
    lc.make_token()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = asyncio.create_task(_run_demo(lc, spec_text, spec.model, timeout, console, stop, exit_when_ready))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        try:
            if runner.done():
                runner.result()  # raise what went wrong
            else:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
        finally:
            stopper.cancel()
            await _shutdown(lc, console)

    code = 0
    try:
        asyncio.run(main())
    except click.ClickException as exc:
        console.print(f"[red]error:[/] {exc.format_message()}")
        code = 1
    except (ApiError, TimeoutError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        code = 1
    finally:
        lc.stop_agents()
        names = sorted({_name(p) for p in lc.processes()})  # e.g. the bootstrap etcd
        lc.kill_all()
        console.print(f"stopped; ended what the agents leave running: {', '.join(names)}" if names else "stopped.")
        lock.close()
    sys.exit(code)
