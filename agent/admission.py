"""The node's side of admission: `pdsupervisor.core.admission`'s rules applied with this
machine's real paths, what can be known about a start before trying it, and what a refused
process is in the node's status.

A refused process is never started: it is listed with state `failed` and a message
`refused: <field> <why>`, so `pdsupervisor status` and `GET /cluster` show it as a problem.
The start checks (`start_problems`) look at this machine as it is now: the command can be
found, the working directory exists, the files' directories can be written. They are asked
of a spec about to start, never of one already running: a binary replaced under a running
engine does not stop it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

from pdsupervisor.core.admission import check_process, refusal_message, show
from pdsupervisor.core.models import ProcessSpec, ProcessState, ProcessStatus


class Admission:
    """This node's rules: files only in `state_dir` (not in the agent's `private_dirs`),
    commands only among `allowed_commands` (fnmatch globs on argv[0]; empty: any)."""

    def __init__(self, state_dir: Path, allowed_commands: Sequence[str] = (),
                 private_dirs: Sequence[Path] = ()) -> None:
        self.state_dir = state_dir
        self.allowed_commands = tuple(allowed_commands)
        self.private_dirs = tuple(private_dirs)

    def problems(self, spec: ProcessSpec, *, starting: bool = True) -> list[str]:
        """The rules `spec` breaks; when `starting` and it breaks none, what would stop its start."""
        cwd = os.getcwd()
        problems = check_process(
            spec, state_dir=str(self.state_dir), allowed_commands=self.allowed_commands, cwd=cwd,
            realpath=os.path.realpath, private_dirs=[str(d) for d in self.private_dirs],
        )
        return problems or (start_problems(spec, cwd) if starting else [])


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def command_problem(spec: ProcessSpec, workdir: str) -> str | None:
    """argv[0] is a file that can be executed: a path (a relative one is under the child's
    `workdir`, as exec sees it), or a bare name found on PATH, the spec's own when it sets
    it as a value (one read from a file or a credential cannot be checked), else the agent's."""
    command = spec.argv[0]
    if "/" in command:
        path = posixpath.join(workdir, command)
        if not os.path.lexists(path):
            return f"argv[0] {show(command)} does not exist"
        return None if _executable(path) else f"argv[0] {show(command)} is not an executable file"
    search = spec.env.get("PATH", os.environ.get("PATH", os.defpath))
    if not isinstance(search, str):
        return None
    if any(_executable(posixpath.join(workdir, d or ".", command)) for d in search.split(":")):
        return None
    return f"argv[0] '{show(command)}' not found on PATH"


def cwd_problem(spec: ProcessSpec, agent_cwd: str) -> str | None:
    if spec.cwd is None:
        return None
    path = posixpath.join(agent_cwd, spec.cwd)
    if not os.path.exists(path):
        return f"cwd {show(spec.cwd)} does not exist"
    return None if os.path.isdir(path) else f"cwd {show(spec.cwd)} is not a directory"


def file_problems(spec: ProcessSpec, workdir: str) -> list[str]:
    """Each file's directory exists and is writable, or can be created (its nearest
    existing ancestor is a writable directory): the agent writes the files before the start."""
    problems = []
    for i, f in enumerate(spec.files):
        directory = posixpath.dirname(posixpath.join(workdir, f.path))
        existing = directory
        while not os.path.lexists(existing) and existing != "/":
            existing = posixpath.dirname(existing)
        if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK):
            continue
        why = "is not writable" if os.path.isdir(existing) else "is not a directory"
        field = f"files[{i}].path {show(f.path)}: directory {show(directory)}"
        problems.append(f"{field} {why}" if existing == directory
                        else f"{field} cannot be created ({show(existing)} {why})")
    return problems


def start_problems(spec: ProcessSpec, agent_cwd: str) -> list[str]:
    """What would stop `spec` from starting here, known before trying (its rules passed:
    no NUL byte in a path). `agent_cwd`: where a process without `cwd` runs."""
    workdir = posixpath.join(agent_cwd, spec.cwd or "")
    try:
        found = [cwd_problem(spec, agent_cwd), command_problem(spec, workdir)]
        return [p for p in found if p] + file_problems(spec, workdir)
    except (OSError, ValueError) as exc:  # a path the OS cannot take: say so, never a dead loop
        return [f"the start cannot be checked: {exc}"]


class RefusedProcess:
    """A process of the assignment this node will not run. It has the parts of a
    `ManagedProcess` the reconciler and the API use; there is nothing to start or stop."""

    pid = None

    def __init__(self, spec: ProcessSpec, problems: list[str]) -> None:
        self.spec = spec
        self.problems = problems
        self.spec_hash = spec.spec_hash()

    @property
    def name(self) -> str:
        return self.spec.name

    def update_spec(self, spec: ProcessSpec) -> None:
        self.spec = spec  # same hash, new generation

    def status(self) -> ProcessStatus:
        s = self.spec
        return ProcessStatus(
            name=s.name, role=s.role, state=ProcessState.failed, spec_hash=self.spec_hash, generation=s.generation,
            endpoint=s.endpoint, dp_rank=s.dp_rank, message=refusal_message(self.problems),
        )

    async def stop(self, *, drain: bool = False) -> None:
        pass

    async def detach(self) -> None:
        pass
