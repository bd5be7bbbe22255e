"""One managed process, in-process: start, restart after kill -9, stop the whole tree."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent.process import logs, proctree
from agent.process.statefile import ProcRecord, ProcStore, matches
from agent.process.supervisor import ManagedProcess, backoff_delay, child_env
from pdsupervisor.core.models import ProcessSpec, ProcessState, RestartPolicy
from pdsupervisor.local.procs import kill_tree
from tests.agent_helpers import TREE
from tests.conftest import until

FAST = RestartPolicy(initial_backoff_s=0.2, max_backoff_s=1.0, jitter=0.1, reset_after_s=30)


@pytest.fixture
def cleanup():
    """Managed processes, and other processes (psutil handles: a pid reaped and reused by the
    time of the teardown is not someone else's to kill), whose trees the teardown kills."""
    started: list[ManagedProcess] = []
    extra: list[psutil.Process] = []
    yield started, extra
    for m in started:
        if m.pid:
            kill_tree(m.pid)
    for proc in extra:
        if proc.is_running():  # same pid *and* start time
            kill_tree(proc.pid)


def mp(tmp_path: Path, spec: ProcessSpec) -> ManagedProcess:
    return ManagedProcess(spec, records=ProcStore(tmp_path / "procs"), log_dir=tmp_path / "logs")


def started(tmp_path: Path, cleanup, spec: ProcessSpec) -> ManagedProcess:
    """`spec` supervised, its tree killed at teardown."""
    m = mp(tmp_path, spec)
    cleanup[0].append(m)
    m.start()
    return m


def script(name: str, code: str, path: Path) -> ProcessSpec:
    """A Python `code` told `path` (where it writes pids), stopped with a 2 s timeout."""
    return ProcessSpec(name=name, role="decode", argv=[sys.executable, "-c", code, str(path)], restart=FAST,
                       stop_timeout_s=2)


async def test_stop_kills_whole_tree_including_setsid_grandchild(tmp_path, cleanup):
    pids_file = tmp_path / "pids"
    m = started(tmp_path, cleanup, script("tree", TREE, pids_file))
    await until(lambda: pids_file.exists() and pids_file.read_text().count(" ") == 1, what="grandchildren")
    a, b = map(int, pids_file.read_text().split())
    cleanup[1].extend([psutil.Process(a), psutil.Process(b)])
    await until(lambda: os.getsid(a) == a, what="grandchild setsid")
    assert os.getsid(b) == m.pid
    root = m.pid
    assert (tmp_path / "procs" / "tree.json").exists()
    await m.stop()
    for pid in (root, a, b):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert m.state == ProcessState.exited
    assert not (tmp_path / "procs" / "tree.json").exists()


async def test_killed_child_is_restarted_with_exit_code(tmp_path, cleanup):
    spec = ProcessSpec(name="sleeper", role="decode", argv=[sys.executable, "-c", "import time; time.sleep(600)"],
                       restart=FAST, env={"NOTIFY_SOCKET": "/nope"})
    m = started(tmp_path, cleanup, spec)
    first = await until(lambda: m.pid, what="first pid")
    await until(lambda: m.state == ProcessState.ready, what="ready")
    assert "NOTIFY_SOCKET" not in psutil.Process(first).environ()
    os.kill(first, signal.SIGKILL)
    await until(lambda: m.state == ProcessState.backoff, what="backoff")
    st = m.status()
    assert st.last_exit_code == -9 and "next attempt" in st.message
    second = await until(lambda: m.pid, what="restart")
    assert second != first and m.restarts == 1
    await m.stop()


# The first run starts a worker that ignores SIGTERM (it writes its pid to argv[1] once it
# does), then exits 3 without it; later runs (the file exists) only sleep.
LEAVES_WORKER = (
    "import os, subprocess, sys, time\n"
    "path = sys.argv[1]\n"
    "if os.path.exists(path):\n"
    "    time.sleep(600)\n"
    "subprocess.Popen([sys.executable, '-c', 'import os, signal, sys, time\\n'\n"
    "                  'signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n'\n"
    "                  'open(sys.argv[1] + \".tmp\", \"w\").write(str(os.getpid()))\\n'\n"
    "                  'os.rename(sys.argv[1] + \".tmp\", sys.argv[1])\\n'\n"
    "                  'time.sleep(600)', path])\n"
    "while not os.path.exists(path):\n"
    "    time.sleep(0.02)\n"
    "sys.exit(3)\n"
)


async def _exits_leaving_a_worker(tmp_path, cleanup) -> tuple[ManagedProcess, psutil.Process]:
    """A managed process whose first run has just exited (reported `backoff`), its worker
    (which outlives SIGTERM for the 2 s stop timeout) still alive."""
    pid_file = tmp_path / "worker.pid"
    m = started(tmp_path, cleanup, script("leaves", LEAVES_WORKER, pid_file))
    worker = psutil.Process(int(await until(lambda: pid_file.exists() and pid_file.read_text(), what="worker")))
    cleanup[1].append(worker)
    st = await until(lambda: (st := m.status()).state == ProcessState.backoff and st, what="exit reported")
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE  # not waiting for the leftovers
    assert st.pid is None and st.last_exit_code == 3 and st.last_failure == "exit code 3"
    assert st.started_at is None and st.ready_after_s is None
    return m, worker


async def test_an_exit_is_reported_at_once_and_the_leftovers_stopped_before_the_next_run(tmp_path, cleanup):
    m, worker = await _exits_leaving_a_worker(tmp_path, cleanup)
    second = await until(lambda: m.pid, what="second run")
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE  # SIGKILLed before it started
    assert m.restarts == 1 and m.status().last_stop and "SIGKILL after 2 s" in m.status().last_stop
    assert second != worker.pid
    await m.stop()


async def test_a_stop_while_the_leftovers_are_stopped_leaves_none(tmp_path, cleanup):
    m, worker = await _exits_leaving_a_worker(tmp_path, cleanup)
    await m.stop()
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert m.state == ProcessState.exited and m.pid is None
    assert not (tmp_path / "procs" / "leaves.json").exists()


async def test_spawn_failure_backs_off_never_gives_up(tmp_path, cleanup):
    spec = ProcessSpec(name="missing", role="proxy", argv=["/nonexistent/binary"], restart=FAST)
    m = started(tmp_path, cleanup, spec)
    await until(lambda: m.restarts >= 2, what="repeated attempts")
    assert m.state in (ProcessState.backoff, ProcessState.starting)
    await m.stop()


async def test_readiness_http_probe_and_files_written(tmp_path, cleanup):
    from pdsupervisor.core.models import FileSpec, Probe
    from pdsupervisor.local.ports import free_port

    port = free_port()
    target = tmp_path / "cfg" / "mooncake.json"
    spec = ProcessSpec(
        name="web", role="proxy", argv=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=str(tmp_path), files=[FileSpec(path=str(target), content='{"a": 1}', mode=0o600)],
        readiness=Probe(kind="http", port=port, path="/", period_s=0.1), restart=FAST,
    )
    m = started(tmp_path, cleanup, spec)
    assert m.status().ready_after_s is None
    began = time.monotonic()
    await until(lambda: m.state == ProcessState.ready, what="http ready")
    ready_after = m.status().ready_after_s
    assert ready_after is not None and 0 <= ready_after <= time.monotonic() - began + 0.1
    assert target.read_text() == '{"a": 1}' and (target.stat().st_mode & 0o777) == 0o600
    await m.stop()


def test_readiness_lost_is_reported_with_since_when_and_cleared_when_ready_again(tmp_path):
    from agent.process.supervisor import UNHEALTHY_AFTER

    m = mp(tmp_path, ProcessSpec(name="web", role="proxy", argv=["x"]))
    m._probed(0)
    assert m.status().state == ProcessState.ready and m.status().ready_lost_at is None
    for failures in range(1, UNHEALTHY_AFTER):
        m._probed(failures)
    assert m.status().state == ProcessState.ready  # a probe or two may fail
    before = time.time()
    m._probed(UNHEALTHY_AFTER)
    st = m.status()
    assert st.state == ProcessState.running and st.message == f"readiness probe failing ({UNHEALTHY_AFTER}x)"
    assert st.ready_lost_at is not None and before <= st.ready_lost_at <= time.time()
    m._probed(UNHEALTHY_AFTER + 1)
    assert m.status().ready_lost_at == st.ready_lost_at  # since the first moment, not the latest probe
    m._probed(0)
    assert m.status().state == ProcessState.ready and m.status().ready_lost_at is None
    m._probed(UNHEALTHY_AFTER)
    m._set(ProcessState.backoff, "exited (exit code 1)")  # this run is over
    assert m.status().ready_lost_at is None


async def test_a_relative_file_is_written_where_the_child_runs(tmp_path, cleanup, monkeypatch):
    from pdsupervisor.core.models import FileSpec

    workdir = tmp_path / "agent-cwd"  # not the state dir (tmp_path): the child runs here
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    spec = ProcessSpec(
        name="reader", role="decode", files=[FileSpec(path="rel/cfg.json", content="seen")], restart=FAST,
        argv=[sys.executable, "-c", "import time; print(open('rel/cfg.json').read(), flush=True); time.sleep(600)"],
    )
    m = started(tmp_path, cleanup, spec)
    await until(lambda: "seen" in m.log_path.read_text() if m.log_path.exists() else False, what="child read it")
    assert (workdir / "rel" / "cfg.json").read_text() == "seen" and m.restarts == 0
    await m.stop()


async def _adoptable(cleanup, **spec_fields) -> tuple[psutil.Popen, ProcessSpec, ProcRecord]:
    """A running sleeper, its spec, and the record an agent would have kept for it."""
    argv = [sys.executable, "-c", "import time; time.sleep(600)"]
    p = psutil.Popen(argv)
    cleanup[1].append(p)
    await until(lambda: p.cmdline() == argv, what="exec")
    spec = ProcessSpec(argv=argv, **spec_fields)
    rec = ProcRecord(name=spec.name, pid=p.pid, create_time=proctree.started(p.pid), spec_hash=spec.spec_hash(),
                     spec=spec.model_dump(mode="json"), started_at=time.time(), boot_id=proctree.boot_id())
    return p, spec, rec


async def test_adoption_record_matches_only_same_process(tmp_path, cleanup):
    _, _, rec = await _adoptable(cleanup, name="x", role="prefill")
    assert matches(rec) is not None
    rec.create_time -= 5  # same pid, different start time: a reused pid
    assert matches(rec) is None
    rec.create_time += 5
    rec.boot_id = "another-boot"  # same pid and start time, but before a reboot
    assert matches(rec) is None
    rec.boot_id = proctree.boot_id()
    assert matches(rec) is not None
    rec.spec["argv"] = ["/bin/other"]
    assert matches(rec) is None


async def test_an_adopted_process_stopped_before_its_task_ran_is_stopped(tmp_path, cleanup):
    """What the bootstrap etcd's reconfiguration does: adopt the old one, stop it at once."""
    p, spec, rec = await _adoptable(cleanup, name="old", role="etcd", stop_timeout_s=2)
    records = ProcStore(tmp_path / "procs")
    records.save(rec)
    m = ManagedProcess(spec, records=records, log_dir=tmp_path / "logs", adopt=(rec, matches(rec)))
    m.start()
    await m.stop()  # the supervision task never got to run
    # it was stopped with the spec's stop_signal, SIGTERM (and is reaped here, being our child)
    assert p.wait(timeout=5) == -signal.SIGTERM
    assert records.load_all() == [] and m.state == ProcessState.exited


def test_backoff_grows_and_caps():
    delays = [backoff_delay(1.0, 2.0, 10.0, 0.0, a) for a in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert all(0.8 <= backoff_delay(1.0, 2.0, 10.0, 0.2, 0) <= 1.2 for _ in range(50))


def test_child_env_strips_notify_socket(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    env = child_env({"A": "1"})
    assert env["A"] == "1" and "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env


def test_copytruncate_rotation_keeps_child_writing(tmp_path, cleanup):
    import subprocess

    path = tmp_path / "logs" / "w.log"
    fd = logs.open_log(path)
    writer = subprocess.Popen(
        [sys.executable, "-u", "-c", "import sys, time\nfor i in range(100000):\n print('x' * 99); time.sleep(0.001)"],
        stdout=fd, stderr=fd, start_new_session=True)
    os.close(fd)
    cleanup[1].append(psutil.Process(writer.pid))
    from tests.conftest import wait_for

    wait_for(lambda: path.stat().st_size > 20_000, what="log grows")
    assert logs.rotate_if_needed(path, 10_000, keep=2)
    after = path.stat().st_size
    rotated = path.with_name("w.log.1").stat().st_size
    assert rotated > 10_000 and after < rotated  # copied, then truncated
    wait_for(lambda: path.stat().st_size > after, what="child keeps writing after truncation")
    # O_APPEND: writes land at the new end, no sparse hole of the old size
    with open(path, "rb") as f:
        assert b"\0" not in f.read(200)
    assert logs.rotate_if_needed(path, 10, keep=2) and path.with_name("w.log.2").exists()
    assert not logs.rotate_if_needed(path, 10**9, keep=2)
    assert logs.tail(path.with_name("w.log.1"), 2) == ["x" * 99] * 2


async def test_workers_of_a_root_reaped_elsewhere_are_still_stopped(tmp_path, cleanup):
    """An adopted engine is not our child: when it dies, init reaps it at once. Its workers
    (same session) must still be found and stopped, not orphaned holding ports and memory."""
    import subprocess
    import sys

    from tests.conftest import wait_for

    pid_file = tmp_path / "worker.pid"
    script = ("import subprocess, sys, time\n"
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "open(sys.argv[1], 'w').write(str(w.pid))\n"
              "time.sleep(600)\n")
    root = subprocess.Popen([sys.executable, "-c", script, str(pid_file)], start_new_session=True)
    cleanup[1].append(psutil.Process(root.pid))  # teardown kills its tree, worker included, whatever fails
    worker = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10, what="worker pid"))
    cleanup[1].append(psutil.Process(worker))
    created = proctree.started(root.pid)
    root.kill()
    root.wait()  # reaped: the root's pid is free, the worker still names it as its session
    assert psutil.pid_exists(worker)
    assert [p.pid for p in proctree.collect_tree(root.pid, created)] == [worker]
    left = await proctree.terminate_tree(root.pid, created, signal.SIGTERM, 2)
    assert left == []
    try:  # dead; a zombie until whatever adopted it reaps it
        assert psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


async def test_a_wall_clock_step_does_not_change_who_is_ours(monkeypatch):
    """NTP stepping the clock moves psutil's create_time(); our identity (start after boot)
    must not move, or stop() would miss our own engine (and adoption would take a stranger)."""
    import psutil._pslinux as pslinux

    child = psutil.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        start = proctree.started(child.pid)
        real_boot = pslinux.boot_time
        monkeypatch.setattr(pslinux, "boot_time", lambda: real_boot() + 5.0)  # the clock stepped 5 s
        assert proctree.same_process(child.pid, start) is not None
        assert await proctree.terminate_tree(child.pid, start, signal.SIGTERM, 2) == []
        assert child.wait(5) == -signal.SIGTERM  # the SIGTERM ended it, not the SIGKILL after the timeout
    finally:
        kill_tree(child.pid)


@pytest.mark.parametrize("n", [0, 1, 7, 250, 10_000])
def test_tail_reads_back_across_chunks(tmp_path, n):
    """Lines of uneven length, a chunk far smaller than the file: the same as reading it all."""
    path = tmp_path / "p.log"
    text = "".join(f"{i} {'y' * (i % 37)}\n" for i in range(3000))
    path.write_text(text)
    assert logs.tail(path, n, chunk=100) == (text.splitlines()[-n:] if n else [])
