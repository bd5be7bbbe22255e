"""The node's side of admission: `pdsupervisor.core.admission`'s rules applied with this
machine's real paths, and what a refused process is in the node's status.

A refused process is never started: it is listed with state `failed` and a message
`refused: <field> <why>`, so `pdsupervisor status` and `GET /cluster` show it as a problem.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pdsupervisor.core.admission import check_process, refusal_message
from pdsupervisor.core.models import ProcessSpec, ProcessState, ProcessStatus


class Admission:
    """This node's rules: files only in `state_dir` (not in the agent's `private_dirs`),
    commands only among `allowed_commands` (fnmatch globs on argv[0]; empty: any)."""

    def __init__(self, state_dir: Path, allowed_commands: Sequence[str] = (),
                 private_dirs: Sequence[Path] = ()) -> None:
        self.state_dir = state_dir
        self.allowed_commands = tuple(allowed_commands)
        self.private_dirs = tuple(private_dirs)

    def problems(self, spec: ProcessSpec) -> list[str]:
        return check_process(
            spec, state_dir=str(self.state_dir), allowed_commands=self.allowed_commands, cwd=os.getcwd(),
            realpath=os.path.realpath, private_dirs=[str(d) for d in self.private_dirs],
        )


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

    async def stop(self) -> None:
        pass

    async def detach(self) -> None:
        pass
