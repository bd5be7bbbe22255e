"""`pdsupervisor status | start | stop | events | logs`: the cluster, through any agent's API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdsupervisor.api.client import DEFAULT_API, ApiClient, ApiError
from pdsupervisor.cli.progress import Lines, Progress, progress_for_stdout
from pdsupervisor.cli.specfile import invalid_spec
from pdsupervisor.core.documents import ClusterDocument, Phase
from pdsupervisor.local.cluster import DEMO_STATE_DIR

T = TypeVar("T")
PHASE_STYLE = {"ready": "green", "degraded": "red", "starting": "yellow", "pending": "yellow", "updating": "yellow",
               "stopping": "yellow", "stopped": "dim"}


def api_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--api", envvar="PDSUPERVISOR_API", default=DEFAULT_API, show_default=True,
                     help="Any agent's API URL (env PDSUPERVISOR_API).")(f)
    f = click.option("--token-file", envvar="PDSUPERVISOR_TOKEN_FILE", type=click.Path(dir_okay=False),
                     help="Bearer token file (env PDSUPERVISOR_TOKEN_FILE; or PDSUPERVISOR_TOKEN).")(f)
    f = click.option("--ca-file", envvar="PDSUPERVISOR_CA_FILE", type=click.Path(dir_okay=False),
                     help="CA bundle for an https API (env PDSUPERVISOR_CA_FILE).")(f)
    return f


TOKEN_HINT = ("pass the agents' token with --token-file FILE (env PDSUPERVISOR_TOKEN_FILE) "
              "or in env PDSUPERVISOR_TOKEN")
DEMO_TOKEN_FILE = DEMO_STATE_DIR / "run" / "token"


def token_hint() -> str:
    """TOKEN_HINT, naming the demo's token file when a demo ran here with its default state dir.
    Named, never read and sent on our own: whoever listens on the API port gets what we send."""
    if os.path.exists(DEMO_TOKEN_FILE):  # False, not an error, in someone else's 0700 directory
        return f"{TOKEN_HINT}; the demo's: export PDSUPERVISOR_TOKEN_FILE={DEMO_TOKEN_FILE}"
    return TOKEN_HINT


def make_client(api: str, token_file: str | None, ca_file: str | None) -> ApiClient:
    """The API client; a client certificate comes from PDSUPERVISOR_CERT_FILE / _KEY_FILE.
    The token goes to `api` only, and only on requests that need it (see `ApiClient`)."""
    token = os.environ.get("PDSUPERVISOR_TOKEN", "").strip() or None
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise click.ClickException(f"--token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise click.ClickException(f"--token-file {token_file} is empty")
    return ApiClient(api, token, ca_file, cert_file=os.environ.get("PDSUPERVISOR_CERT_FILE"),
                     key_file=os.environ.get("PDSUPERVISOR_KEY_FILE"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run API calls; connection, HTTP and wait errors become a one-line message and exit 1."""
    try:
        return asyncio.run(coro)
    except ApiError as exc:
        hint = f"\n{token_hint()}" if exc.status == 401 and not exc.withheld else ""
        raise click.ClickException(f"{exc}{hint}") from None
    except TimeoutError as exc:  # a wait that ran out (also what aiohttp raises on a slow answer)
        raise click.ClickException(str(exc) or "the agent API did not answer in time") from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the agent API: {exc or type(exc).__name__}") from None


def _uptime(started_at: float | None, state: str) -> str:
    if not started_at or state not in ("running", "ready"):
        return ""
    s = int(time.time() - started_at)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def status_table(doc: ClusterDocument, console: Console) -> None:
    phase = doc.phase
    console.print(
        f"+ Cluster: [bold]{doc.cluster or '-'}[/] (generation {doc.generation}) "
        f"phase: [{PHASE_STYLE.get(phase, 'white')}]{phase}[/]  leader: {doc.leader or '-'}  "
        f"proxy: {doc.proxy_url or '-'}"
    )
    for item in doc.missing:  # escaped: what a process printed is no markup ("[rank0]: ...", "[/x]")
        console.print(f"  [yellow]missing[/] {escape(item)}")
    for item in doc.problems:
        console.print(f"  [red]problem[/] {escape(item)}")
    if doc.rollout is not None:
        console.print(f"  [yellow]rollout[/] {doc.rollout.state}: " + "; ".join(
            f"{r.role} {r.updated}/{r.total} changed, {r.unavailable} not ready "
            + ("(a DP group: one wave)" if r.group else f"(at most {r.max_unavailable} at a time)")
            for r in doc.rollout.roles))
    table = Table(box=None, pad_edge=False)
    for col in ("Node", "Role", "Process", "Endpoint", "State", "DP", "Pid", "Restarts", "Uptime"):
        table.add_column(col)
    for p in doc.processes:
        state = p.state
        style = "green" if state == "ready" else ("red" if state in ("failed", "lost", "backoff", "exited", "crash-looping")
                                                  else "")
        table.add_row(
            p.node, p.role, p.name, p.endpoint or "",
            f"[{style}]{state}[/]" if style else state,
            "" if p.dp_rank is None else str(p.dp_rank),
            str(p.pid or ""), str(p.restarts), _uptime(p.started_at, state),
        )
    console.print(table)
    for p in doc.processes:
        if p.state.startswith("crash-looping") and p.last_failure:
            console.print(f"  [red]crash loop[/] {p.name} on {p.node}: restarts {p.restarts}, last: {escape(p.last_failure)}")


@click.command("status")
@api_options
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status_command(api: str, token_file: str | None, ca_file: str | None, output: str) -> None:
    """Cluster phase and every process, like `patronictl list`, and etcd's members."""
    client = make_client(api, token_file, ca_file)
    if output == "json":
        doc = run(client.cluster())
        click.echo(json.dumps(doc.model_dump(mode="json"), indent=2))
        return
    out = console()
    line = run(etcd_line(client))  # first: without a quorum GET /cluster fails, and this says why
    try:
        status_table(run(client.cluster()), out)
    finally:
        out.print(line)


async def etcd_line(client: ApiClient) -> str:
    """`etcd: 3/3 members up, leader node1, db 1.2 MiB` (and which member is down), or why not known."""
    try:
        doc = await client.etcd()
    except (ApiError, OSError, TimeoutError) as exc:
        return escape(f"etcd: members unknown ({exc})")
    style = "green" if doc.has_quorum and doc.up == len(doc.members) else ("yellow" if doc.has_quorum else "red")
    return f"[{style}]{escape(doc.summary())}[/]"


class RolloutHalted(click.ClickException):
    """`start --wait`: an engine failed with its new spec, so the rollout stopped (exit 1)."""


async def wait_for_phase(client: ApiClient, want: Phase, timeout_s: float,
                         progress: Progress | Callable[[str], None], poll_s: float = 0.25) -> ClusterDocument:
    """Poll `GET /cluster` until `want`, showing progress (a `Progress`, or a function given
    each new line); TimeoutError on timeout."""
    shown = progress if isinstance(progress, Progress) else Lines(progress)
    deadline = time.monotonic() + timeout_s
    while True:
        doc = await client.cluster()
        shown.show(doc)
        if doc.phase == want:
            return doc
        if doc.start_timed_out and want == "ready":
            raise TimeoutError(f"start failed: {'; '.join(doc.problems)}")
        if doc.rollout is not None and doc.rollout.state == "halted" and want == "ready":
            raise RolloutHalted(f"{doc.rollout.reason}; the engines not yet changed keep running the previous spec")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {want} after {timeout_s:.0f}s: {shown.last}")
        await asyncio.sleep(poll_s)


@click.command("start")
@api_options
@click.option("-f", "--file", "spec_file", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--replace", is_flag=True, help="Replace a running spec.")
@click.option("--wait/--no-wait", default=False, help="Wait until the cluster is ready.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait with --wait.")
def start_command(api: str, token_file: str | None, ca_file: str | None, spec_file: str, replace: bool,
                  wait: bool, timeout: float) -> None:
    """Submit a cluster spec; with --wait, show progress until ready.

    Exit 2 when the agent finds the spec invalid (as `plan` and `doctor` do), 1 on any other error.
    """
    client = make_client(api, token_file, ca_file)
    try:
        text = Path(spec_file).read_text()
    except OSError as exc:
        raise click.ClickException(f"{spec_file}: {exc.strerror}") from None
    refused: list[tuple[str, str]] = []

    async def go() -> None:
        try:
            answer = await client.start(text, replace=replace)
        except ApiError as exc:
            if exc.status == 400 and exc.error is not None and exc.error.problems:
                refused.extend((p.field, p.message) for p in exc.error.problems)
                return
            if exc.status == 409 and exc.error is not None and exc.error.generation:
                raise click.ClickException(f"{exc}\n{replace_hint(spec_file)}") from None
            raise
        note = f" ({answer.message})" if answer.message else ""
        click.echo(f"accepted: generation {answer.generation}{note}")
        for line in answer.impact:
            click.echo(f"  {line}")
        if wait:
            progress = progress_for_stdout(click.echo)
            try:
                doc = await wait_for_phase(client, "ready", timeout, progress)
            finally:
                progress.close()
            click.echo(f"ready: proxy at {doc.proxy_url}")

    run(go())
    if refused:
        invalid_spec(spec_file, refused, "invalid (the agent answered HTTP 400)")


def replace_hint(spec_file: str) -> str:
    """What a 409 on submit means and what to do (a running spec of another generation)."""
    return (f"another spec is running; `pdsupervisor start --replace -f {spec_file}` to replace it "
            "(or `pdsupervisor stop --wait` first)")


@click.command("stop")
@api_options
@click.option("--wait/--no-wait", default=False, help="Wait until every process is stopped.")
@click.option("--timeout", default=600.0, show_default=True)
def stop_command(api: str, token_file: str | None, ca_file: str | None, wait: bool, timeout: float) -> None:
    """Ordered stop: proxy, engines, master."""
    client = make_client(api, token_file, ca_file)

    async def go() -> None:
        answer = await client.stop()
        click.echo(f"stopping generation {answer.generation}")
        if wait:
            progress = progress_for_stdout(click.echo)
            try:
                await wait_for_phase(client, "stopped", timeout, progress)
            finally:
                progress.close()

    run(go())


@click.command("events")
@api_options
@click.option("-n", "--limit", default=50, show_default=True)
def events_command(api: str, token_file: str | None, ca_file: str | None, limit: int) -> None:
    """Recent cluster events."""
    for ev in run(make_client(api, token_file, ca_file).events(limit)):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.ts))
        click.echo(f"{stamp}  {ev.kind:<8} {ev.message}")


@click.command("logs")
@api_options
@click.argument("node")
@click.argument("process")
@click.option("-n", "--tail", default=100, show_default=True)
@click.option("-f", "--follow", is_flag=True)
def logs_command(api: str, token_file: str | None, ca_file: str | None, node: str, process: str,
                 tail: int, follow: bool) -> None:
    """A process's log, fetched from its node's agent (its `api_url` in etcd)."""
    client = make_client(api, token_file, ca_file)

    async def go() -> None:
        nodes = {n.name: n for n in (await client.nodes()).nodes}
        if node not in nodes:
            raise click.ClickException(f"no registered node {node!r}; nodes: {', '.join(sorted(nodes)) or 'none'}")
        url = nodes[node].api_url
        there = client.at(url)  # the token only if `url` is safe for it
        name = (await there.health()).get("name")
        if name != node:  # e.g. a loopback-only agent's 127.0.0.1 URL, read on another machine
            raise click.ClickException(
                f"node {node}'s API {url} (from etcd) answers as {name!r}: an agent without a credential "
                "listens on loopback only; run this on that node, or give the agents a token")
        async for line in there.logs(process, tail, follow):
            click.echo(line, nl=False)

    try:
        run(go())
    except KeyboardInterrupt:
        pass
