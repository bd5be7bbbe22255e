"""Env values read on the node at each start: secrets live in files here, never in etcd.

A process's env value may be `{file: PATH}` or `{credential: NAME}` (a systemd credential of
the agent's unit, `$CREDENTIALS_DIRECTORY/NAME`). The agent reads it just before the spawn,
so etcd, the plan and the adoption record hold only where it is. One trailing newline is
dropped. Only a regular file is read (never a FIFO or a device that could block the agent or
never end), at most `MAX_BYTES`; it may not hold a NUL (an env value cannot).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from pdsupervisor.core.models import EnvFromCredential, EnvValue

MAX_BYTES = 64 * 1024
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # set by systemd for a unit with LoadCredential=


class EnvFileError(Exception):
    """An env value that cannot be read; the message names the variable and the file."""


def read_value(path: str) -> str:
    """The content of `path` as an env value. Raises OSError or ValueError saying why not."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES} bytes")
    if b"\0" in data:
        raise ValueError("holds a NUL byte")
    if data.endswith(b"\n"):
        data = data[:-1]
    return os.fsdecode(data)  # any bytes: the child's environment gets them back as they were


def resolve_env(env: Mapping[str, EnvValue], credentials_dir: str | None) -> dict[str, str]:
    """`env` with every file and credential read. Raises EnvFileError for the first that fails."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, str):
            out[name] = value
            continue
        if isinstance(value, EnvFromCredential):
            if not credentials_dir:
                raise EnvFileError(f"env {name}: credential {value.credential}: the agent has no "
                                   f"${CREDENTIALS_ENV} (LoadCredential= in its systemd unit)")
            path = os.path.join(credentials_dir, value.credential)
        else:
            path = value.file
        try:
            out[name] = read_value(path)
        except OSError as exc:
            raise EnvFileError(f"env {name}: cannot read {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise EnvFileError(f"env {name}: {path}: {exc}") from exc
    return out
