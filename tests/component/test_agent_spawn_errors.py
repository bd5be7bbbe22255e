"""A start that raises anything is a failed start: reason in the status, normal backoff, the
supervision loop alive (it used to die on anything but OSError, leaving `starting` forever)."""

from __future__ import annotations

import sys

import psutil
import pytest

from agent.process.statefile import ProcStore
from agent.process.supervisor import ManagedProcess
from pdsupervisor.core.models import ProcessSpec, ProcessState, RestartPolicy
from tests.conftest import until

FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, jitter=0.1, reset_after_s=30)
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]



async def _fails_and_retries(m: ManagedProcess, why: str) -> None:
    await until(lambda: m.restarts >= 2, what="repeated attempts")
    assert m._task is not None and not m._task.done()  # the loop lives on
    assert m.state in (ProcessState.backoff, ProcessState.starting)
    await until(lambda: m.state == ProcessState.backoff, what="backoff")
    assert m.message.startswith(f"spawn failed: {why}") and "next attempt at" in m.message
    assert m.pid is None
    await m.stop()


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"argv": [sys.executable, "-c", "print('a\0b')"]}, "ValueError: embedded null byte"),
        ({"argv": SLEEP, "env": {"X": "a\0b"}}, "ValueError: embedded null byte"),
        ({"argv": SLEEP, "cwd": "/nonexistent/dir"}, "[Errno 2] No such file or directory: '/nonexistent/dir'"),
    ],
    ids=["nul-in-argv", "nul-in-env", "missing-cwd"],
)
async def test_a_start_that_raises_backs_off_with_its_reason(managed, fields, why):
    m = managed(ProcessSpec(name="bad", role="decode", restart=FAST, **fields))
    await _fails_and_retries(m, why)


async def test_a_file_that_cannot_be_written_is_a_failed_start(managed, tmp_path):
    from pdsupervisor.core.models import FileSpec

    spec = ProcessSpec(name="bad", role="decode", argv=SLEEP, restart=FAST,
                       files=[FileSpec(path=str(tmp_path / "a\0b.json"), content="{}")])
    await _fails_and_retries(managed(spec), "ValueError: embedded null byte")


class _FullDisk(ProcStore):
    def save(self, rec) -> None:
        self.pids = [*getattr(self, "pids", []), rec.pid]
        raise OSError(28, "No space left on device")


async def test_a_child_started_but_not_recorded_is_killed_not_left_unseen(managed, tmp_path):
    records = _FullDisk(tmp_path / "procs")
    m = managed(ProcessSpec(name="unrecorded", role="decode", argv=SLEEP, restart=FAST), records)
    await _fails_and_retries(m, "[Errno 28] No space left on device")
    assert len(records.pids) >= 2
    for pid in records.pids:  # every attempt's child is gone (killed and reaped)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
