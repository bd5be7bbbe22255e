"""Why a process ended, for people: exit codes decoded, the line of its log that says why."""

from __future__ import annotations

import pytest

from pdsupervisor.core.exits import (
    MAX_REASON,
    clip,
    describe_exit,
    failure_reason,
    last_meaningful_line,
    signal_name,
    spoken_duration,
)


@pytest.mark.parametrize("code, said", [
    (None, "exit code unknown"),
    (0, "exit code 0"),
    (1, "exit code 1"),
    (2, "exit code 2"),
    (125, "exit code 125"),
    (126, "not executable"),
    (127, "command not found or a shared library missing"),
    (128, "exit code 128"),
    (129, "exit code 129: killed by SIGHUP (1), as a shell reports it"),
    (137, "exit code 137: killed by SIGKILL (9), as a shell reports it"),
    (139, "exit code 139: killed by SIGSEGV (11), as a shell reports it"),
    (143, "exit code 143: killed by SIGTERM (15), as a shell reports it"),
    (160, "exit code 160: killed by signal 32, as a shell reports it"),  # glibc's own, no name
    (192, "exit code 192: killed by SIGRTMAX (64), as a shell reports it"),
    (193, "exit code 193"),  # past the last signal: a plain code
    (255, "exit code 255"),
    (-9, "killed by SIGKILL (9)"),
    (-15, "killed by SIGTERM (15)"),
    (-6, "killed by SIGABRT (6)"),
    (-11, "killed by SIGSEGV (11)"),
    (-2, "killed by SIGINT (2)"),
    (-77, "killed by signal 77"),
])
def test_exit_codes_are_decoded(code, said):
    assert describe_exit(code) == said


def test_a_signal_is_named_with_its_number():
    assert signal_name(9) == "SIGKILL (9)" and signal_name(0) == "signal 0" and signal_name(99) == "signal 99"


def test_the_last_line_is_the_reason():
    assert last_meaningful_line(["loading", "libibverbs.so.1: cannot open shared object file: No such file"]) == \
        "libibverbs.so.1: cannot open shared object file: No such file"


@pytest.mark.parametrize("lines", [
    [],
    [""],
    ["   ", "\t"],
    ["--- pd-agent: starting decode-0 (abc) at 2024-01-01T00:00:00+0000 ---"],
    ["--- pd-agent: starting decode-0 (abc) at x ---", "--- pd-agent: starting decode-0 (abc) at y ---", ""],
    ["^^^^^^", "-----", "====="],
])
def test_nothing_meaningful_is_none(lines):
    assert last_meaningful_line(lines) is None


def test_blank_lines_and_the_agents_own_lines_are_skipped():
    lines = ["--- pd-agent: starting x (h) at t ---", "boom: disk full", "", "  ",
             "--- pd-agent: exited: exit code 1 ---", ""]
    assert last_meaningful_line(lines) == "boom: disk full"


def test_only_the_last_run_counts():
    """A run that said nothing has no reason from the run before it."""
    lines = ["--- pd-agent: starting x (h) at 1 ---", "old failure", "--- pd-agent: starting x (h) at 2 ---"]
    assert last_meaningful_line(lines) is None
    assert last_meaningful_line([*lines, "new failure"]) == "new failure"


TRACEBACK = """\
INFO starting the engine
Traceback (most recent call last):
  File "/opt/vllm/entrypoint.py", line 12, in <module>
    main()
  File "/opt/vllm/entrypoint.py", line 9, in main
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB
"""


def test_a_traceback_gives_its_exception_line():
    assert last_meaningful_line(TRACEBACK.splitlines()) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_the_exception_line_wins_over_what_is_printed_after_it():
    after = [*TRACEBACK.splitlines(), "[rank0]:[W101 12:00:00] ProcessGroupNCCL.cpp:1168 destroy_process_group() "
             "was not called", "INFO shutting down", ""]
    assert last_meaningful_line(after) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_the_last_of_chained_tracebacks_and_a_multi_line_message():
    chained = """\
Traceback (most recent call last):
  File "a.py", line 1, in <module>
KeyError: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "a.py", line 3, in <module>
ValueError: bad config
  second line of the message
"""
    assert last_meaningful_line(chained.splitlines()) == "ValueError: bad config"


def test_a_traceback_under_a_prefix_on_every_line():
    lines = ["[rank0]: Traceback (most recent call last):", '[rank0]:   File "w.py", line 4, in run',
             "[rank0]:     step()", "[rank0]: torch.OutOfMemoryError: CUDA out of memory", "[rank0]: "]
    assert last_meaningful_line(lines) == "torch.OutOfMemoryError: CUDA out of memory"


def test_a_traceback_cut_off_before_its_exception_gives_the_last_line():
    lines = ["Traceback (most recent call last):", '  File "a.py", line 1, in <module>', "    f()"]
    assert last_meaningful_line(lines) == "f()"


def test_warnings_at_exit_are_noise():
    lines = [
        "ValueError: no model at /models/x",
        "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear "
        "to be 1 leaked semaphore objects to clean up at shutdown",
        "  warnings.warn('resource_tracker: There appear to be %d '",
    ]
    assert last_meaningful_line(lines) == "ValueError: no model at /models/x"


def test_colour_codes_are_removed():
    assert last_meaningful_line(["\x1b[31mERROR\x1b[0m engine died\x1b[K"]) == "ERROR engine died"


def test_a_long_line_is_cut_with_an_ellipsis():
    line = last_meaningful_line(["x" * 1000])
    assert line is not None and len(line) == MAX_REASON and line.endswith("…")
    assert clip("short") == "short" and clip("abcdef", 4) == "abc…" and clip("abcd", 4) == "abcd"


def test_a_failure_reason_is_the_decoded_code_and_the_line():
    assert failure_reason(127, ["mooncake_master: error while loading shared libraries: libibverbs.so.1: cannot "
                                "open shared object file: No such file or directory"]) == (
        "command not found or a shared library missing: mooncake_master: error while loading shared libraries: "
        "libibverbs.so.1: cannot open shared object file: No such file or directory")
    assert failure_reason(-9, []) == "killed by SIGKILL (9)"
    assert failure_reason(1, TRACEBACK.splitlines()) == \
        "exit code 1: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert len(failure_reason(1, ["y" * 1000])) <= 2 * MAX_REASON
    assert failure_reason(None, ["bye"], adopted=True) == "exit code unknown (adopted): bye"
    assert failure_reason(None, []) == "exit code unknown"


@pytest.mark.parametrize("seconds, said", [
    (0, "0 s"), (0.4, "0.4 s"), (0.04, "0 s"), (2.0, "2 s"), (9.96, "10 s"), (-3, "0 s"), (45, "45 s"),
    (59.6, "1 min"), (60, "1 min"), (113, "1 min 53 s"),
    (3599, "59 min 59 s"), (3600, "1 h"), (7500, "2 h 5 min"),
])
def test_durations_for_people(seconds, said):
    assert spoken_duration(seconds) == said
