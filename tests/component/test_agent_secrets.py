"""Env values from files and systemd credentials, read by the agent at each start: the engine
sees the secret, etcd and the agent's records hold only where it is."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from agent.process.secrets import MAX_BYTES, EnvFileError, read_value, resolve_env
from agent.process.statefile import ProcStore
from agent.process.supervisor import ManagedProcess
from pdsupervisor.core.models import EnvFromCredential, EnvFromFile, ProcessSpec, ProcessState, RestartPolicy
from pdsupervisor.local.procs import kill_tree
from tests.agent_helpers import run
from tests.component import test_agent_daemon as daemon_tests
from tests.component.test_agent_daemon import spec
from tests.conftest import until, wait_for

env = daemon_tests.env  # the fixture: (view of etcd, factory of real agents), all killed after

SECRET = "hf_s3cr3t-" + os.urandom(6).hex()
FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, jitter=0.1, reset_after_s=30)
# a child that copies the variables named in argv[2:] to the file argv[1], then sleeps
DUMP = ("import os, sys, time\n"
        "open(sys.argv[1], 'w').write('\\n'.join(os.environ.get(k, '<unset>') for k in sys.argv[2:]))\n"
        "time.sleep(600)\n")


@pytest.mark.parametrize(
    "content, value",
    [(b"tok\n", "tok"), (b"tok", "tok"), (b"tok\n\n", "tok\n"), (b"a\nb\n", "a\nb"), (b"", ""), (b"\n", ""),
     (b"caf\xc3\xa9\n", "café"), (b"\xff", os.fsdecode(b"\xff"))],
)
def test_one_trailing_newline_is_dropped(tmp_path, content, value):
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert read_value(str(path)) == value


def test_what_is_not_a_plain_small_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "big").write_bytes(b"x" * (MAX_BYTES + 1))
    (tmp_path / "max").write_bytes(b"x" * MAX_BYTES)
    (tmp_path / "nul").write_bytes(b"a\0b")
    done = threading.Event()

    def fifo_read() -> None:  # a FIFO must not block the agent: refused at once, not read
        with pytest.raises(ValueError, match="not a regular file"):
            read_value(str(fifo))
        done.set()

    t = threading.Thread(target=fifo_read, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set()
    with pytest.raises(ValueError, match="not a regular file"):
        read_value("/dev/zero")
    with pytest.raises(ValueError, match=f"larger than {MAX_BYTES} bytes"):
        read_value(str(tmp_path / "big"))
    assert len(read_value(str(tmp_path / "max"))) == MAX_BYTES
    with pytest.raises(ValueError, match="holds a NUL byte"):
        read_value(str(tmp_path / "nul"))


def test_resolve_names_the_variable_and_the_file(tmp_path):
    (tmp_path / "tok").write_text("t\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hf_token").write_text(SECRET + "\n")
    env_ = {"A": "plain", "B": EnvFromFile(file=str(tmp_path / "tok")), "C": EnvFromCredential(credential="hf_token")}
    assert resolve_env(env_, str(creds)) == {"A": "plain", "B": "t", "C": SECRET}
    with pytest.raises(EnvFileError, match=f"^env B: cannot read {tmp_path}/gone: No such file or directory$"):
        resolve_env({"B": EnvFromFile(file=str(tmp_path / "gone"))}, None)
    with pytest.raises(EnvFileError, match=f"^env C: cannot read {creds}/other: No such file"):
        resolve_env({"C": EnvFromCredential(credential="other")}, str(creds))
    with pytest.raises(EnvFileError, match=r"^env C: credential hf_token: the agent has no \$CREDENTIALS_DIRECTORY"):
        resolve_env({"C": EnvFromCredential(credential="hf_token")}, None)
    with pytest.raises(EnvFileError, match=f"^env B: {tmp_path}: not a regular file$"):
        resolve_env({"B": EnvFromFile(file=str(tmp_path))}, None)


async def test_a_missing_secret_is_a_failed_start_then_read_once_it_exists(tmp_path):
    secret = tmp_path / "hf_token"
    out = tmp_path / "seen"
    spec_ = ProcessSpec(name="engine", role="prefill", restart=FAST,
                        argv=[sys.executable, "-c", DUMP, str(out), "HF_TOKEN"],
                        env={"HF_TOKEN": EnvFromFile(file=str(secret))})
    m = ManagedProcess(spec_, records=ProcStore(tmp_path / "procs"), log_dir=tmp_path / "logs")
    m.start()
    try:
        await until(lambda: m.state == ProcessState.backoff and m.restarts >= 1, what="failed start")
        assert m.message.startswith(f"spawn failed: env HF_TOKEN: cannot read {secret}: No such file or directory")
        secret.write_text(SECRET + "\n")
        await until(lambda: out.exists() and out.read_text() == SECRET, what="the engine sees the secret")
        assert SECRET not in (tmp_path / "procs" / "engine.json").read_text()  # the record holds the path
    finally:
        if m.pid:
            kill_tree(m.pid)
        await m.stop()


def test_the_engine_sees_the_secret_and_etcd_only_the_path(env, tmp_path):
    view, agent = env
    (tmp_path / "hf_token").write_text(SECRET + "\n")
    creds = tmp_path / "credentials"  # what systemd's LoadCredential= would give the agent
    creds.mkdir()
    (creds / "api_key").write_text("key-" + SECRET)
    out = tmp_path / "seen"
    a = agent(env={"CREDENTIALS_DIRECTORY": str(creds)})
    engine = spec("prefill-0", [sys.executable, "-c", DUMP, str(out), "HF_TOKEN", "API_KEY", "CREDENTIALS_DIRECTORY"],
                  env={"HF_TOKEN": EnvFromFile(file=str(tmp_path / "hf_token")),
                       "API_KEY": EnvFromCredential(credential="api_key")})
    view.assign("n1", engine)
    wait_for(lambda: view.status("n1").get("prefill-0", {}).get("state") == "ready", timeout=15, what="engine ready")
    wait_for(lambda: out.exists() and out.read_text().count("\n") == 2, what="the engine's env")
    assert out.read_text().split("\n") == [SECRET, "key-" + SECRET, "<unset>"]
    raw = run(view._do(lambda s: s.get(s.keys.assignment("n1")))).value.decode()
    assert SECRET not in raw
    assert f'"HF_TOKEN":{{"file":"{tmp_path / "hf_token"}"}}' in raw and '"API_KEY":{"credential":"api_key"}' in raw
    status = run(view._do(lambda s: s.get(s.keys.node_status("n1")))).value.decode()
    assert SECRET not in status
    assert SECRET not in (a.state_dir / "procs" / "prefill-0.json").read_text()
    assert SECRET not in a.logs()
