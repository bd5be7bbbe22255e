"""What the node checks before a start (`agent.admission.start_problems`), on real tmp paths."""

from __future__ import annotations

import os
import sys

import pytest

from agent.admission import Admission, start_problems
from pdsupervisor.core.models import EnvFromFile, FileSpec, ProcessSpec


def proc(argv: list[str] | None = None, **fields) -> ProcessSpec:
    return ProcessSpec(name="p", role="decode", argv=argv or [sys.executable, "-c", "pass"], **fields)


def executable(path, text: str = "#!/bin/sh\n", mode: int = 0o755):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_startable_spec_has_no_problems(tmp_path):
    (tmp_path / "run").mkdir()
    spec = proc(cwd=str(tmp_path / "run"), files=[FileSpec(path=str(tmp_path / "new" / "deeper" / "c.json"), content=""),
                                                  FileSpec(path="rel.json", content="")])
    assert start_problems(spec, "/") == []


def test_argv0_paths(tmp_path):
    executable(tmp_path / "tool")
    executable(tmp_path / "plain", mode=0o644)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    cases = {
        str(tmp_path / "tool"): [],
        "/nonexistent/bin": ["argv[0] /nonexistent/bin does not exist"],
        str(tmp_path / "plain"): [f"argv[0] {tmp_path / 'plain'} is not an executable file"],
        str(tmp_path / "dir"): [f"argv[0] {tmp_path / 'dir'} is not an executable file"],
        str(tmp_path / "dangling"): [f"argv[0] {tmp_path / 'dangling'} is not an executable file"],
    }
    for argv0, want in cases.items():
        assert start_problems(proc([argv0]), "/") == want, argv0


def test_a_relative_argv0_is_found_under_the_processs_cwd(tmp_path):
    (tmp_path / "run").mkdir()
    executable(tmp_path / "run" / "tool")
    assert start_problems(proc(["./tool"], cwd=str(tmp_path / "run")), "/") == []
    assert start_problems(proc(["./tool"], cwd="run"), str(tmp_path)) == []  # cwd relative to the agent's
    assert start_problems(proc(["./tool"]), str(tmp_path)) == ["argv[0] ./tool does not exist"]


def test_a_bare_name_is_looked_up_on_the_specs_path_or_the_agents(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "vllmx")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert start_problems(proc(["vllmx"]), "/") == ["argv[0] 'vllmx' not found on PATH"]
    assert start_problems(proc(["vllmx"], env={"PATH": f"/nonexistent:{bin_dir}"}), "/") == []
    monkeypatch.setenv("PATH", str(bin_dir))
    assert start_problems(proc(["vllmx"]), "/") == []
    assert start_problems(proc(["vllmx"], env={"PATH": "/nonexistent"}), "/") == ["argv[0] 'vllmx' not found on PATH"]
    # a PATH read at start from a file cannot be checked now: not refused for it
    assert start_problems(proc(["nothere"], env={"PATH": EnvFromFile(file=str(tmp_path / "p"))}), "/") == []
    executable(bin_dir / "data", mode=0o644)
    assert start_problems(proc(["data"]), "/") == ["argv[0] 'data' not found on PATH"]


def test_cwd(tmp_path):
    (tmp_path / "file").write_text("")
    assert start_problems(proc(cwd=str(tmp_path / "x")), "/") == [f"cwd {tmp_path / 'x'} does not exist"]
    assert start_problems(proc(cwd=str(tmp_path / "file")), "/") == [f"cwd {tmp_path / 'file'} is not a directory"]
    assert start_problems(proc(cwd="x"), str(tmp_path)) == ["cwd x does not exist"]


def test_file_directories_must_be_directories_or_creatable(tmp_path):
    (tmp_path / "blocker").write_text("")
    spec = proc(files=[FileSpec(path=str(tmp_path / "blocker" / "c.json"), content=""),
                       FileSpec(path=str(tmp_path / "blocker" / "d" / "e.json"), content=""),
                       FileSpec(path=str(tmp_path / "ok" / "f.json"), content="")])
    assert start_problems(spec, "/") == [
        f"files[0].path {tmp_path}/blocker/c.json: directory {tmp_path}/blocker is not a directory",
        f"files[1].path {tmp_path}/blocker/d/e.json: directory {tmp_path}/blocker/d cannot be created "
        f"({tmp_path}/blocker is not a directory)",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory it can reach")
def test_file_directories_must_be_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    spec = proc(files=[FileSpec(path=str(locked / "a.json"), content=""),
                       FileSpec(path=str(locked / "sub" / "b.json"), content="")])
    locked.chmod(0o555)
    try:
        assert start_problems(spec, "/") == [
            f"files[0].path {locked}/a.json: directory {locked} is not writable",
            f"files[1].path {locked}/sub/b.json: directory {locked}/sub cannot be created ({locked} is not writable)",
        ]
    finally:
        locked.chmod(0o755)


def test_admission_checks_a_start_only_when_asked_and_the_rules_pass(tmp_path):
    admission = Admission(tmp_path)
    missing = proc(["/nonexistent/bin"])
    assert admission.problems(missing) == ["argv[0] /nonexistent/bin does not exist"]
    assert admission.problems(missing, starting=False) == []  # already running: not stopped for it
    hostile = proc(["/nonexistent/bin"], files=[FileSpec(path="/etc/x", content="")])
    (rule,) = admission.problems(hostile)  # a rule broken: the start is not even considered
    assert rule.startswith("files[0].path /etc/x is outside the state dir")
