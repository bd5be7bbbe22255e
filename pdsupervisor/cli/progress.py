"""What `start --wait` and `stop --wait` show while they poll `GET /cluster`.

Each document is summed up in one line: phase, members, engines ready, the proxy, what is
missing, the problems. Problems carry counters that change from one poll to the next (a
backoff's countdown and attempt, restarts, seconds since a start or a submission); they are
left out of the line, so the same state gives the same line and a new line means something
changed: the phase, a count, a problem that appeared or went away.

Not on a terminal (CI, a pipe) each new line is printed (`Lines`); on a terminal one live
line is redrawn in place (`LiveLine`) and the last one stays when the wait ends.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from rich.console import Console
from rich.status import Status
from rich.text import Text

from pdsupervisor.core.documents import ClusterDocument

# (pattern, replacement): the parts of a problem that change while nothing else does
VOLATILE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r";?\s*next attempt at [^;()]*\([^)]*\)"), ""),  # the agent's backoff: "at 14:03:12 (in 4.1s, attempt 5)"
    (re.compile(r"\s*\(in [0-9.]+\s*s\b[^)]*\)"), ""),  # any other countdown
    (re.compile(r",?\s*restarts \d+"), ""),
    (re.compile(r"\b[0-9.]+ s after\b"), "after"),  # "not ready 130 s after starting", "... after submission"
    (re.compile(r"\s*\(\)"), ""),  # what the counters above leave of "(restarts 12)"
)


def calm(problem: str) -> str:
    """`problem` without its counters."""
    for pattern, replacement in VOLATILE:
        problem = pattern.sub(replacement, problem)
    return problem


def progress_line(doc: ClusterDocument) -> str:
    """The document in one line that changes only when the cluster does."""
    procs = doc.processes
    engines = [p for p in procs if p.role in ("prefill", "decode")]
    ready = sum(1 for p in engines if p.state == "ready")
    proxy = next((p.state for p in procs if p.role == "proxy"), "waiting")
    line = f"{doc.phase}: members {len(doc.members)}, engines ready {ready}/{len(engines)}, proxy {proxy}"
    if doc.missing:
        line += f"; missing: {'; '.join(doc.missing)}"
    if doc.problems:
        line += f"; problems: {'; '.join(calm(p) for p in doc.problems)}"
    return line


@runtime_checkable
class Progress(Protocol):
    last: str | None

    def show(self, doc: ClusterDocument) -> None: ...

    def close(self) -> None: ...


class Lines:
    """A line each time the progress line changes."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.last: str | None = None

    def show(self, doc: ClusterDocument) -> None:
        line = progress_line(doc)
        if line != self.last:
            self.echo(line)
            self.last = line

    def close(self) -> None:
        pass


class LiveLine:
    """One line redrawn in place (a spinner, then the line cut to the terminal's width); when
    the wait ends, the last line is printed in full and stays."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last: str | None = None
        self._status: Status | None = None

    def show(self, doc: ClusterDocument) -> None:
        line = progress_line(doc)
        if line == self.last:
            return
        self.last = line
        text = Text(line)
        text.truncate(max(10, self.console.width - 3), overflow="ellipsis")  # the spinner and a space before it
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
            if self.last is not None:
                self.console.print(Text(self.last))


def progress_for_stdout(echo: Callable[[str], None]) -> Progress:
    """A live line on a terminal; otherwise `echo` each new line."""
    return LiveLine(Console()) if sys.stdout.isatty() else Lines(echo)
