"""What an agent agrees to run: pure checks of one `ProcessSpec` against the node's rules.

An assignment is root code execution on its node. etcd's TLS and client certificates decide
who may write one; these checks are the node's own line behind that (defence in depth): a
process whose spec breaks a rule is refused, the rest of the assignment still runs.

The rules, each reported as `<field> <what is wrong>`:

- `name` matches `PROCESS_NAME_RE` and has no `..` (it names `logs/<name>.log` and
  `procs/<name>.json` in the state dir);
- `argv` items and `cwd` hold no NUL, `argv[0]` is not empty;
- `env` names match `ENV_NAME_RE`, values hold no NUL;
- `files` resolve (relative paths against the process's cwd, as the agent writes them,
  then symlinks followed) to a path strictly inside the agent's state dir, outside the
  agent's own directories in it, with a plain permission mode (no setuid, setgid, sticky);
- with `allowed_commands` (fnmatch globs), `argv[0]` must match one of them; it may then
  have no `..` component, and a bare name (looked up on PATH) may not come with its own PATH;
- an HTTP readiness probe's `path` is a request path (`REQUEST_PATH_PATTERN`): the agent
  writes it as is into the request line it sends, so a CR or LF in it would add headers or
  whole requests of the writer's choosing.

No I/O here: the caller gives its working directory and a `realpath` (the agent passes
`os.path.realpath`; the default only normalises the text).
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence

from pdsupervisor.core.models import ProcessSpec

PROCESS_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
PROCESS_NAME_RE = re.compile(PROCESS_NAME_PATTERN)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)
# The request target of an HTTP readiness probe: "/" then visible ASCII (no space, no CR, LF or
# other control character), as it goes into the probe's request line.
REQUEST_PATH_PATTERN = r"^/[\x21-\x7e]*$"
REQUEST_PATH_RE = re.compile(REQUEST_PATH_PATTERN)
SPECIAL_MODE_BITS = 0o7000  # setuid, setgid, sticky
SHOWN_CHARS = 256  # of a value quoted in a problem (a long path stays whole)
SHOWN_PROBLEMS = 5  # in a status message


def show(value: str) -> str:
    """A value as a problem quotes it: as is when printable, else repr; clipped."""
    text = value if value.isprintable() else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def problems_text(problems: Sequence[str]) -> str:
    """The first problems, and how many more: what a status says of a refusal."""
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def refusal_message(problems: Sequence[str]) -> str:
    """The status message of a refused process."""
    return f"refused: {problems_text(problems)}"


def name_problems(name: str) -> list[str]:
    if not PROCESS_NAME_RE.match(name):
        return [f"name {show(name)} does not match {PROCESS_NAME_PATTERN}"]
    if ".." in name:
        return [f"name {show(name)} contains '..'"]
    return []


def request_path_problem(path: str) -> str | None:
    """Why `path` cannot be an HTTP probe's request target, or None when it can."""
    if REQUEST_PATH_RE.fullmatch(path):
        return None
    return f"{show(path)} is not a request path: '/' then visible ASCII, no space, CR, LF or other control character"


def env_problems(env: Mapping[str, object], field: str = "env") -> list[str]:
    """Names and string values of an environment (other values are checked by their kind)."""
    problems = []
    for key, value in env.items():
        if not ENV_NAME_RE.match(key):
            problems.append(f"{field} name {show(key)} does not match {ENV_NAME_PATTERN}")
        elif isinstance(value, str) and "\0" in value:
            problems.append(f"{field}.{key} contains a NUL byte")
    return problems


def _inside(path: str, directory: str) -> bool:
    """`path` is `directory` or below it (both canonical)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _file_problems(
    spec: ProcessSpec, *, state_dir: str, cwd: str, realpath: Callable[[str], str], private_dirs: Sequence[str],
) -> list[str]:
    problems: list[str] = []
    try:
        root = realpath(state_dir)
        private = [realpath(d) for d in private_dirs]
    except (OSError, ValueError) as exc:
        return [f"files: the state dir {show(state_dir)} cannot be resolved ({exc})"]
    for i, f in enumerate(spec.files):
        field = f"files[{i}]"
        if f.mode < 0 or f.mode > 0o7777:
            problems.append(f"{field}.mode {f.mode} is not a permission mode")
        elif f.mode & SPECIAL_MODE_BITS:
            problems.append(f"{field}.mode {f.mode:#o} has setuid, setgid or sticky bits")
        if "\0" in f.path:
            problems.append(f"{field}.path contains a NUL byte")
            continue
        # where the agent writes it: a relative path is under the child's cwd (the agent's when none)
        where = posixpath.join(cwd, spec.cwd or "", f.path)
        try:
            real = realpath(where)
        except (OSError, ValueError) as exc:
            problems.append(f"{field}.path {show(f.path)} cannot be resolved ({exc})")
            continue
        shown = show(f.path) if real == f.path else f"{show(f.path)} (resolved: {show(real)})"
        if real == root or not _inside(real, root):
            problems.append(f"{field}.path {shown} is outside the state dir {show(root)}")
            continue
        for d in private:
            if _inside(real, d):
                problems.append(f"{field}.path {shown} is in the agent's own directory {show(d)}")
                break
    return problems


def _command_problems(spec: ProcessSpec, allowed_commands: Sequence[str]) -> list[str]:
    command = spec.argv[0]
    if ".." in command.split("/"):
        return [f"argv[0] {show(command)} has a '..' component (allowed_commands is set)"]
    if not any(fnmatch.fnmatchcase(command, glob) for glob in allowed_commands):
        return [f"argv[0] {show(command)} matches none of allowed_commands ({', '.join(allowed_commands)})"]
    if "/" not in command and "PATH" in spec.env:
        return [f"env.PATH is set while argv[0] {show(command)} is looked up on PATH (allowed_commands is set)"]
    return []


def check_process(
    spec: ProcessSpec,
    *,
    state_dir: str,
    allowed_commands: Sequence[str] = (),
    cwd: str = "/",
    realpath: Callable[[str], str] = posixpath.normpath,
    private_dirs: Sequence[str] = (),
) -> list[str]:
    """Every rule `spec` breaks on this node (empty: it may run).

    `state_dir`: where files may go; `private_dirs`: the agent's own directories, no files
    there; `allowed_commands`: fnmatch globs on argv[0], empty allows any; `cwd`: the
    agent's working directory (a process without `cwd` runs there); `realpath`: resolves a
    path to its canonical form (symlinks followed).
    """
    problems = name_problems(spec.name)
    if not spec.argv or not spec.argv[0]:
        problems.append("argv[0] is empty")
    problems += [f"argv[{i}] contains a NUL byte" for i, item in enumerate(spec.argv) if "\0" in item]
    if spec.cwd is not None and "\0" in spec.cwd:
        problems.append("cwd contains a NUL byte")
    problems += env_problems(spec.env)
    if spec.readiness is not None and spec.readiness.kind == "http":
        why = request_path_problem(spec.readiness.path)
        problems += [f"readiness.path {why}"] if why else []
    problems += _file_problems(spec, state_dir=state_dir, cwd=cwd, realpath=realpath, private_dirs=private_dirs)
    if allowed_commands and spec.argv and spec.argv[0] and "\0" not in spec.argv[0]:
        problems += _command_problems(spec, allowed_commands)
    return problems
