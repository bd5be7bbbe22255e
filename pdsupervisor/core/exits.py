"""Why a process ended, in one line for people: its exit code decoded, and the last thing it said.

`describe_exit(code)` follows Python's convention for the code (`-N`: killed by signal N) and
decodes what a shell reports (`128+N`: its child was killed by signal N; 126 and 127: the
command could not be run). `last_meaningful_line(lines)` picks, from the end of a process's
log, the line that most likely says why: the exception line of its last traceback, else the
last line that is not noise (blank lines, the agent's own `--- pd-agent: ... ---` lines, a
traceback's frames, Python warnings). Only the output of the last run counts: reading stops at
the agent's `--- pd-agent: starting ...` header. `failure_reason` puts the two together.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Sequence

MAX_REASON = 200  # characters of a line kept in a status, a problem or an event
AGENT_MARK = "--- pd-agent: "  # how the agent's own lines in a process log begin
START_MARK = AGENT_MARK + "starting "  # the first line of each run's output
TRACEBACK = "Traceback (most recent call last):"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # colour and cursor escape sequences
_NOISE = (
    re.compile(r"^(During handling of the above exception, another exception occurred:"
               r"|The above exception was the direct cause of the following exception:)$"),
    re.compile(r"^\S.*?:\d+: \w*Warning: "),  # a Python warning (`x.py:12: UserWarning: ...`)
    re.compile(r"^warnings\.warn\("),  # the source line a warning shows under it
    re.compile(r"resource_tracker: There appear to be \d+ leaked"),  # multiprocessing at exit
)


def signal_name(number: int) -> str:
    """`SIGKILL (9)`, or `signal 77` for a number without a name."""
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return f"signal {number}"


def describe_exit(code: int | None) -> str:
    """An exit code for people: `killed by SIGKILL (9)`, `not executable`, `exit code 1`..."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        return f"killed by {signal_name(-code)}"
    if code == 126:
        return "not executable"
    if code == 127:
        return "command not found or a shared library missing"
    if 128 < code <= 128 + 64:  # a shell's way to say its child died of signal N
        return f"exit code {code}: killed by {signal_name(code - 128)}, as a shell reports it"
    return f"exit code {code}"


def clip(line: str, limit: int = MAX_REASON) -> str:
    """`line` cut to `limit` characters, an ellipsis saying so."""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _clean(line: str) -> str:
    return _ANSI.sub("", line).strip()


def _noise(line: str) -> bool:
    """Says nothing about why: blank, the agent's, a traceback frame or marker, a warning,
    or no letter at all (carets under a frame, borders)."""
    return (not line or line.startswith(AGENT_MARK) or line == TRACEBACK or line.startswith('File "')
            or not any(c.isalpha() for c in line) or any(p.search(line) for p in _NOISE))


def _last_run(lines: Sequence[str]) -> Sequence[str]:
    for i in range(len(lines) - 1, -1, -1):
        if _clean(lines[i]).startswith(START_MARK):
            return lines[i + 1:]
    return lines


def _exception_line(lines: Sequence[str]) -> str | None:
    """The exception line of the last traceback in `lines`: the first line after its header
    that is not indented (a frame), under whatever prefix the header had (`[rank0]: `)."""
    for i in range(len(lines) - 1, -1, -1):
        raw = _ANSI.sub("", lines[i]).rstrip()
        at = raw.find(TRACEBACK)
        if at < 0:
            continue
        prefix = raw[:at]
        for later in lines[i + 1:]:
            text = _ANSI.sub("", later).rstrip()
            if prefix and text.startswith(prefix):
                text = text[len(prefix):]
            if text and not text[0].isspace() and not _noise(text.strip()):
                return text.strip()
        return None  # cut off before its exception line: no better guess than the last line
    return None


def last_meaningful_line(lines: Iterable[str]) -> str | None:
    """The line of a log's tail most likely to say why the process ended (see the module)."""
    run = _last_run(list(lines))
    found = _exception_line(run)
    if found is None:
        found = next((c for line in reversed(run) if not _noise(c := _clean(line))), None)
    return clip(found) if found else None


def failure_reason(code: int | None, lines: Iterable[str], *, adopted: bool = False) -> str:
    """`<describe_exit>: <last meaningful line>`, or the decoded exit code alone. An adopted
    process is not the agent's child: its exit code cannot be known."""
    what = "exit code unknown (adopted)" if adopted and code is None else describe_exit(code)
    said = last_meaningful_line(lines)
    return clip(f"{what}: {said}" if said else what, 2 * MAX_REASON)


def spoken_duration(seconds: float) -> str:
    """`0.5 s`, `45 s`, `1 min 53 s`, `2 h 5 min`: how long, for people."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}".removesuffix(".0") + " s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    hours, minutes = s // 3600, s % 3600 // 60
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
