"""Whether `pdsupervisor demo` runs the Mooncake master: it decides by running it (here fake
`mooncake_master`s on PATH, the way the demo and its agents find the binary)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pdsupervisor.cli.demo import master_cannot_run

LOADER = ("{0}: error while loading shared libraries: libibverbs.so.1: cannot open shared object file: "
          "No such file or directory")


def fake_master(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "mooncake_master"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}:/usr/bin:/bin")  # nothing else named mooncake_master
    return d


def test_a_master_missing_a_shared_library_cannot_run_and_the_loader_says_why(bin_dir):
    path = fake_master(bin_dir, f'echo "{LOADER.format("$0")}" >&2; exit 127')
    assert master_cannot_run("mooncake_master") == LOADER.format(path)


def test_exit_127_or_126_without_a_message_is_decoded(bin_dir):
    fake_master(bin_dir, "exit 127")
    assert "exited with 127 (not found or a shared library missing)" in (master_cannot_run("mooncake_master") or "")
    fake_master(bin_dir, "echo 'permission denied: engine' >&2; exit 126")
    assert master_cannot_run("mooncake_master") == f"{bin_dir}/mooncake_master exited with 126 (not executable): " \
                                                   "permission denied: engine"


def test_a_master_that_prints_its_flags_can_run(bin_dir):
    # gflags' --help: the flags on stdout, exit 1
    fake_master(bin_dir, 'echo "  Flags from master.cpp:"; echo "    -port (port) type: int32"; exit 1')
    assert master_cannot_run("mooncake_master") is None


def test_a_master_that_hangs_or_crashes_on_help_cannot_run(bin_dir):
    fake_master(bin_dir, "exec sleep 30")
    assert master_cannot_run("mooncake_master", timeout_s=0.5) == f"`{bin_dir}/mooncake_master --help` did not finish in 0.5s"
    fake_master(bin_dir, "kill -SEGV $$")
    assert master_cannot_run("mooncake_master") == f"`{bin_dir}/mooncake_master --help` was killed by SIGSEGV"


def test_not_on_path_or_not_executable(bin_dir):
    assert master_cannot_run("mooncake_master") == ("mooncake_master not installed (pip install "
                                                    "mooncake-transfer-engine-non-cuda; it needs Debian's libibverbs1)")
    path = fake_master(bin_dir, "exit 0")
    path.chmod(path.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    assert "not installed" in (master_cannot_run("mooncake_master") or "")  # which() wants an executable

