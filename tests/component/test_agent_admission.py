"""A real pd-agent and etcd: hostile processes written straight into the assignment key are
refused, with why, in the node's status and the events; the rest of the assignment runs. A
refused new spec for a running process stops nothing: the running one keeps serving."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from agent.admission import Admission
from pdsupervisor.core.models import FileSpec, ProcessSpec
from tests.agent_helpers import SLEEP, alive, run
from tests.component import test_agent_daemon as daemon_tests
from tests.component.test_agent_daemon import View, spec
from tests.conftest import wait_for

env = daemon_tests.env  # the fixture: (view of etcd, factory of real agents), all killed after

TOUCH = "import sys; open(sys.argv[1], 'w').close(); import time; time.sleep(600)"


def config_file(tmp_path: Path, **fields) -> list[str]:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(fields))
    return ["--config", str(path)]


def refused(view: View, node: str, name: str) -> str | None:
    p = view.status(node).get(name)
    return p["message"] if p and p["state"] == "failed" and p["message"].startswith("refused: ") else None


def test_hostile_processes_are_refused_and_the_good_one_runs(env, tmp_path):
    view, agent = env
    state = tmp_path / "state-n1"
    outside = tmp_path / "outside"
    outside.mkdir()
    state.mkdir()
    (state / "link").symlink_to(outside)  # a path under the state dir that leads out of it
    a = agent(state_dir=state, extra=config_file(tmp_path, allowed_commands=[sys.executable]))
    hostile = [
        spec("../../../x", [sys.executable, "-c", TOUCH, str(outside / "by-name")]),
        spec("suid", [sys.executable, "-c", TOUCH, str(outside / "by-suid")],
             files=[FileSpec(path=str(outside / "suid-shell"), content="#!/bin/sh\n", mode=0o4755)]),
        spec("escape", [sys.executable, "-c", TOUCH, str(outside / "by-escape")],
             files=[FileSpec(path=str(state / "link" / "cron"), content="* * * * * root id\n")]),
        spec("shell", ["/bin/sh", "-c", f"touch {outside / 'by-shell'}; sleep 600"]),
    ]
    view.assign("n1", spec("good", SLEEP), *hostile)
    wait_for(lambda: view.status("n1").get("good", {}).get("state") == "ready", timeout=15, what="good ready")
    messages = {p.name: wait_for(lambda p=p: refused(view, "n1", p.name), what=f"{p.name} refused") for p in hostile}
    assert "name ../../../x does not match" in messages["../../../x"]
    assert messages["suid"] == (f"refused: files[0].mode 0o4755 has setuid, setgid or sticky bits; "
                                f"files[0].path {outside / 'suid-shell'} is outside the state dir {state}")
    assert f"is outside the state dir {state}" in messages["escape"] and f"(resolved: {outside}/cron)" in messages["escape"]
    assert messages["shell"].startswith("refused: argv[0] /bin/sh matches none of allowed_commands")
    st = view.status("n1")
    assert all(st[p.name]["pid"] is None and st[p.name]["restarts"] == 0 for p in hostile)
    # nothing of theirs ran or was written, inside or outside the state dir
    assert sorted(os.listdir(outside)) == []
    assert not (tmp_path / "x.log").exists() and not (state / "procs" / "suid.json").exists()
    assert sorted(os.listdir(state / "logs")) == ["good.log"]
    # ... and each refusal is an event
    events = wait_for(lambda: (ev := [e for e in run(view._do(lambda s: s.events(100))) if e["kind"] == "refused"])
                      and len(ev) == len(hostile) and ev, what="a refused event per process")
    assert {e["process"] for e in events} == {p.name for p in hostile}
    assert all(e["node"] == "n1" for e in events)
    assert any("suid on n1 refused: files[0].mode 0o4755" in e["message"] for e in events)
    # the agent's own view says the same
    assert a.local_procs()["shell"]["message"] == messages["shell"]

    # a running process whose spec turns hostile keeps running as it was (nothing of the new
    # spec runs), its status says what was refused; a fixed one starts
    good = view.status("n1")["good"]
    turned = spec("good", SLEEP, files=[FileSpec(path=str(outside / "turned"), content="")])
    fixed = spec("shell", SLEEP + ["fixed"])
    view.assign("n1", turned, fixed)
    wait_for(lambda: view.status("n1").get("shell", {}).get("state") == "ready", timeout=15, what="fixed one runs")
    now = wait_for(lambda: (g := view.status("n1")["good"])["refused_spec_hash"] == turned.spec_hash() and g,
                   what="the turned spec refused")
    assert (now["pid"], now["spec_hash"], now["state"]) == (good["pid"], good["spec_hash"], "ready") and alive(good["pid"])
    assert now["refused"] == f"files[0].path {outside / 'turned'} is outside the state dir {state}"
    assert sorted(os.listdir(outside)) == []
    assert set(view.status("n1")) == {"good", "shell"}


def test_a_refused_new_spec_stops_nothing_and_a_good_one_replaces_it(env):
    view, agent = env
    agent()
    view.assign("n1", spec("eng", SLEEP))
    first = wait_for(lambda: (p := view.status("n1").get("eng", {})).get("state") == "ready" and p,
                     timeout=15, what="eng ready")
    bad = spec("eng", ["/nonexistent/bin", "serve"])
    view.assign("n1", bad)
    now = wait_for(lambda: (p := view.status("n1")["eng"])["refused_spec_hash"] == bad.spec_hash() and p,
                   what="the new spec refused")
    assert now["refused"] == "argv[0] /nonexistent/bin does not exist"
    assert (now["pid"], now["spec_hash"], now["state"]) == (first["pid"], first["spec_hash"], "ready")
    assert alive(first["pid"])
    event = wait_for(lambda: [e for e in run(view._do(lambda s: s.events(100)))
                              if e["kind"] == "refused" and e["process"] == "eng"], what="a refused event")
    assert event[0]["message"] == (f"eng on n1 refused: argv[0] /nonexistent/bin does not exist; "
                                   f"the running one (spec {first['spec_hash']}) keeps running")
    good = spec("eng", SLEEP + ["v2"])
    view.assign("n1", good)
    now = wait_for(lambda: (p := view.status("n1")["eng"])["spec_hash"] == good.spec_hash()
                   and p["state"] == "ready" and p, timeout=15, what="the good spec runs")
    assert now["pid"] != first["pid"] and not alive(first["pid"])
    assert now["refused_spec_hash"] is None and now["refused"] is None


def test_the_agent_resolves_real_symlinks(tmp_path):
    state = tmp_path / "state"
    (state / "procs").mkdir(parents=True)
    (state / "out").symlink_to("/etc")
    (tmp_path / "st").symlink_to(state)  # a symlinked state dir is still the state dir
    admission = Admission(tmp_path / "st", private_dirs=[tmp_path / "st" / "procs"])

    def files(*paths: str) -> list[str]:
        return admission.problems(ProcessSpec(name="p", role="decode", argv=["/bin/true"],
                                              files=[FileSpec(path=p, content="") for p in paths]))

    assert files(str(state / "mooncake" / "c.json"), str(tmp_path / "st" / "c.json")) == []
    (p,) = files(str(state / "out" / "passwd"))
    assert p.endswith(f"(resolved: /etc/passwd) is outside the state dir {state}")
    (p,) = files(str(tmp_path / "st" / "procs" / "x.json"))
    assert f"is in the agent's own directory {state}/procs" in p
