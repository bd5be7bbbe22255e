"""What a node refuses to run: every rule of `pdsupervisor.core.admission`, each on its own."""

from __future__ import annotations

import posixpath

import pytest

from pdsupervisor.core.admission import check_process, refusal_message, show
from pdsupervisor.core.models import FileSpec, Probe, ProcessSpec

STATE = "/var/lib/pdsupervisor"
PRIVATE = [f"{STATE}/procs", f"{STATE}/logs"]


def proc(**fields) -> ProcessSpec:
    base = {"name": "decode-0", "role": "decode", "argv": ["/usr/bin/python3", "-m", "vllm"]}
    return ProcessSpec(**{**base, **fields})


def problems(spec: ProcessSpec, **kw) -> list[str]:
    kw.setdefault("state_dir", STATE)
    kw.setdefault("private_dirs", PRIVATE)
    return check_process(spec, **kw)


def test_a_planned_engine_is_admitted():
    spec = proc(env={"VLLM_DP_RANK": "3", "_X1": ""}, cwd="/opt/vllm",
                files=[FileSpec(path=f"{STATE}/mooncake/c.json", content="{}", mode=0o640)])
    assert problems(spec) == []
    assert problems(spec, allowed_commands=["/usr/bin/python3*"]) == []


@pytest.mark.parametrize("name", ["a", "decode-0", "mooncake-master", "x.y_z", "A" * 63, "0"])
def test_good_names(name):
    assert problems(proc(name=name)) == []


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../../x", "does not match"),
        ("a/b", "does not match"),
        ("", "does not match"),
        (".hidden", "does not match"),
        ("-x", "does not match"),
        ("A" * 64, "does not match"),
        ("a b", "does not match"),
        ("a\nb", "does not match"),
        ("a..b", "contains '..'"),
        ("a.." , "contains '..'"),
    ],
)
def test_bad_names(name, why):
    (p,) = problems(proc(name=name))
    assert p.startswith("name ") and why in p


def test_argv_rules():
    assert problems(proc(argv=[""])) == ["argv[0] is empty"]
    assert problems(proc(argv=["/bin/x", "a\0b", "c", "\0"])) == [
        "argv[1] contains a NUL byte", "argv[3] contains a NUL byte"]
    assert problems(proc(argv=["/bin/x\0"])) == ["argv[0] contains a NUL byte"]
    assert problems(proc(cwd="/tmp\0x")) == ["cwd contains a NUL byte"]


@pytest.mark.parametrize("key", ["1X", "A-B", "A B", "A=B", "", "Ä", "X\0"])
def test_bad_env_names(key):
    (p,) = problems(proc(env={key: "v"}))
    assert p.startswith("env name ") and "does not match ^[A-Za-z_][A-Za-z0-9_]*$" in p


def test_env_values_hold_no_nul():
    assert problems(proc(env={"OK": "fine", "BAD": "a\0b"})) == ["env.BAD contains a NUL byte"]


@pytest.mark.parametrize(
    "path, cwd",
    [
        (f"{STATE}/mooncake/x.json", None),
        (f"{STATE}/a/../b.json", None),  # normalised: still inside
        ("mooncake/x.json", STATE),  # relative: under the process's cwd
        ("x.json", f"{STATE}/work"),
        (f"{STATE}/proxy/r.json", "/opt"),  # absolute: the cwd does not matter
    ],
)
def test_files_inside_the_state_dir_are_admitted(path, cwd):
    assert problems(proc(cwd=cwd, files=[FileSpec(path=path, content="")])) == []


@pytest.mark.parametrize(
    "path, cwd, agent_cwd, why",
    [
        ("/etc/x", None, "/", f"files[0].path /etc/x is outside the state dir {STATE}"),
        (f"{STATE}/../../../etc/cron.d/x", None, "/", "(resolved: /etc/cron.d/x) is outside the state dir"),
        ("x.json", None, "/", "(resolved: /x.json) is outside the state dir"),  # the agent's cwd under systemd
        ("x.json", None, STATE, None),  # ... or its state dir
        ("../x", STATE, "/", "(resolved: /var/lib/x) is outside"),
        ("x", "../../tmp", STATE, "(resolved: /var/tmp/x) is outside"),  # a relative cwd is under the agent's
        (STATE, None, "/", f"files[0].path {STATE} is outside the state dir"),  # the dir itself
        (f"{STATE}-evil/x", None, "/", "is outside the state dir"),  # a prefix is not a parent
        (f"{STATE}/procs/decode-0.json", None, "/", f"is in the agent's own directory {STATE}/procs"),
        (f"{STATE}/logs", None, "/", f"is in the agent's own directory {STATE}/logs"),
        ("/tmp/a\0b", None, "/", "files[0].path contains a NUL byte"),
    ],
)
def test_files_outside_the_state_dir_are_refused(path, cwd, agent_cwd, why):
    got = problems(proc(cwd=cwd, files=[FileSpec(path=path, content="")]), cwd=agent_cwd)
    if why is None:
        assert got == []
    else:
        (p,) = got
        assert p.startswith("files[0].path ") and why in p


def test_symlinks_are_followed_by_the_given_realpath():
    links = {f"{STATE}/cfg": "/etc"}  # STATE/cfg -> /etc

    def realpath(path: str) -> str:
        path = posixpath.normpath(path)
        for link, target in links.items():
            if path == link or path.startswith(link + "/"):
                return target + path[len(link):]
        return path

    spec = proc(files=[FileSpec(path=f"{STATE}/cfg/passwd", content=""),
                       FileSpec(path=f"{STATE}/ok.json", content="")])
    assert problems(spec, realpath=realpath) == [
        f"files[0].path {STATE}/cfg/passwd (resolved: /etc/passwd) is outside the state dir {STATE}"]
    # the state dir itself is resolved the same way: a symlinked state dir is fine
    links = {"/state": STATE}
    assert problems(proc(files=[FileSpec(path="/state/x.json", content="")]), state_dir="/state",
                    realpath=realpath) == []


def test_a_path_that_cannot_be_resolved_is_refused():
    def realpath(path: str) -> str:
        raise OSError(40, "Too many levels of symbolic links")

    (p,) = problems(proc(files=[FileSpec(path=f"{STATE}/x", content="")]), realpath=realpath)
    assert "cannot be resolved" in p and "Too many levels" in p


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1777, 0o6644, 0o7000])
def test_setuid_setgid_sticky_modes_are_refused(mode):
    (p,) = problems(proc(files=[FileSpec(path=f"{STATE}/x", content="", mode=mode)]))
    assert p == f"files[0].mode {mode:#o} has setuid, setgid or sticky bits"


@pytest.mark.parametrize("mode", [-1, 0o10000, 0o100644])
def test_modes_that_are_not_permissions_are_refused(mode):
    (p,) = problems(proc(files=[FileSpec(path=f"{STATE}/x", content="", mode=mode)]))
    assert p == f"files[0].mode {mode} is not a permission mode"


@pytest.mark.parametrize("mode", [0, 0o600, 0o644, 0o777])
def test_plain_modes_are_admitted(mode):
    assert problems(proc(files=[FileSpec(path=f"{STATE}/x", content="", mode=mode)])) == []


def test_every_file_is_checked_and_named_by_index():
    files = [FileSpec(path=f"{STATE}/ok", content=""), FileSpec(path="/etc/x", content="", mode=0o4755)]
    assert problems(proc(files=files)) == [
        "files[1].mode 0o4755 has setuid, setgid or sticky bits",
        f"files[1].path /etc/x is outside the state dir {STATE}",
    ]


ALLOWED = ["/usr/bin/python3*", "/opt/vllm/bin/*", "mooncake_master"]


@pytest.mark.parametrize("argv0", ["/usr/bin/python3", "/usr/bin/python3.11", "/opt/vllm/bin/vllm", "mooncake_master"])
def test_allowed_commands_admit_matches(argv0):
    assert problems(proc(argv=[argv0]), allowed_commands=ALLOWED) == []


@pytest.mark.parametrize(
    "argv0, env, why",
    [
        ("/bin/sh", {}, "argv[0] /bin/sh matches none of allowed_commands (/usr/bin/python3*, /opt/vllm/bin/*, mooncake_master)"),
        ("/usr/bin/Python3", {}, "matches none"),  # case matters
        ("python3", {}, "matches none"),  # a bare name is not a path glob's match
        ("/opt/vllm/bin/../../../bin/sh", {}, "argv[0] /opt/vllm/bin/../../../bin/sh has a '..' component"),
        ("mooncake_master", {"PATH": "/tmp/evil"}, "env.PATH is set while argv[0] mooncake_master is looked up on PATH"),
    ],
)
def test_allowed_commands_refuse_the_rest(argv0, env, why):
    (p,) = problems(proc(argv=[argv0], env=env), allowed_commands=ALLOWED)
    assert why in p


def test_no_allowed_commands_means_any_command():
    assert problems(proc(argv=["/bin/sh", "-c", "id"])) == []
    assert problems(proc(argv=["python3"], env={"PATH": "/x"})) == []


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/", "/health?full=1&x=%0D", "/~a/b-c_d.e"])
def test_request_paths_of_http_probes_are_admitted(path):
    assert problems(proc(readiness=Probe(port=8200, path=path))) == []


@pytest.mark.parametrize("path", [
    "/health HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /",  # the probe writes it into its request line
    "/health\n", "/health\r", "/a b", "/a\tb", "health", "", "/h\x7f", "/h\u00e9",
])
def test_a_probe_path_that_would_change_the_request_is_refused(path):
    (p,) = problems(proc(readiness=Probe(port=8200, path=path)))
    assert p.startswith(f"readiness.path {show(path)} is not a request path")


def test_a_tcp_probe_has_no_path_to_check():
    assert problems(proc(readiness=Probe(kind="tcp", port=8200, path="/x\r\n"))) == []


def test_every_broken_rule_is_reported():
    spec = proc(name="../x", argv=["/bin/sh", "a\0"], env={"1": "x"},
                files=[FileSpec(path="/etc/x", content="", mode=0o4755)])
    got = problems(spec, allowed_commands=["/usr/bin/*"])
    assert [p.split(" ")[0] for p in got] == ["name", "argv[1]", "env", "files[0].mode", "files[0].path", "argv[0]"]


def test_messages_quote_values_safely_and_briefly():
    assert show("/etc/x") == "/etc/x"
    assert show("a\nb") == "'a\\nb'"
    assert len(show("x" * 1000)) == 256 and show("x" * 1000).endswith("...")
    assert refusal_message(["a", "b"]) == "refused: a; b"
    assert refusal_message([str(i) for i in range(8)]) == "refused: 0; 1; 2; 3; 4; and 3 more"
