"""A spec file named on the command line: read and validated, and one exit status for an invalid
spec whoever finds it (`plan` and `doctor` here, `start` from the agent's 400 answer)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import click

from pdsupervisor.core.spec import ClusterSpec, SpecError, load_spec

INVALID_SPEC_EXIT = 2  # like a usage error: the input is wrong, retrying will not help


def invalid_spec(spec_file: Path | str, problems: Iterable[tuple[str, str]], why: str = "invalid") -> NoReturn:
    """Print every problem as `field: why` on stderr and exit INVALID_SPEC_EXIT."""
    click.echo(f"{spec_file}: {why}:", err=True)
    for path, problem in problems:
        click.echo(f"  {path}: {problem}", err=True)
    sys.exit(INVALID_SPEC_EXIT)


def read_spec(spec_file: Path) -> ClusterSpec:
    """The validated spec in `spec_file`; unreadable: a ClickException (exit 1); invalid: `invalid_spec`."""
    try:
        return load_spec(spec_file.read_text())
    except OSError as exc:
        raise click.ClickException(f"{spec_file}: {exc.strerror}") from None
    except SpecError as exc:
        invalid_spec(spec_file, exc.problems)
