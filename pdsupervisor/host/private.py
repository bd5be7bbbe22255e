"""Private directories and files that nobody else can redirect (keys, the demo's state).

A directory in a shared place such as /tmp may have been created, or replaced by a symbolic
link, by another user before we came. `private_dir` makes it (0700) or accepts it only when it
is a real directory of ours that nobody else can write; files are created with O_EXCL and
O_NOFOLLOW, so a planted symlink or file is refused, never followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pdsupervisor.host.files import atomic_write


class UnsafePath(OSError):
    """A path someone else could have planted or can write: refused, not used."""


def private_dir(path: str | Path, mode: int = 0o700) -> Path:
    """`path` as a directory of ours with `mode` (made when missing; its parents as usual).

    An existing one must be a real directory (not a symlink), owned by us and not writable
    by group or others; it is then set to `mode`. UnsafePath otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:  # opened, not looked up again: what we check is what we chmod
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symbolic link; refusing to use it") from exc
        raise UnsafePath(f"{path} is not a directory we can use: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}); refusing to use it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafePath(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                             "refusing to use it")
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def create_file(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Write a new file; FileExistsError if anything (a symlink too) is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
    """`create_file`, or with `replace` an atomic replacement (a symlink in its place is
    replaced, never followed)."""
    if replace:
        atomic_write(path, data, mode)
    else:
        create_file(path, data, mode)


def open_lock(path: str | Path) -> int:
    """A lock file's descriptor (read/write, made 0600 when missing), never through a symlink."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symbolic link; refusing to open it") from exc
        raise
