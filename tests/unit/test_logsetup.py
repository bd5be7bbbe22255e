"""One logging setup: structlog and stdlib loggers write the same key=value lines, which the benches parse."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# configure_logging replaces the root logger's handlers: a process of its own, not pytest's
SCRIPT = """
import logging, sys
from pdsupervisor.host.logsetup import configure_logging, structlog
configure_logging("info")
logging.getLogger("pdsupervisor.proxy").info("proxy listening on %s:%d (%s)", "127.0.0.1", 8868, "static")
logging.getLogger("pdsupervisor.simengine").info("sim engine %s (kv_role=%s) listening on %s:%d", "m", None, "::", 1)
logging.getLogger("aiohttp.server").debug("below the level")
structlog.get_logger("agent").info("rest api listening", url="http://127.0.0.1:8470")
structlog.get_logger("agent").debug("below the level too")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("pdsupervisor.proxy.etcd").exception("membership watch failed")
print("rich" in sys.modules)
"""
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}"


def _run() -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60, check=True)
    return out.stderr.splitlines(), out.stdout.strip()


def test_stdlib_and_structlog_lines_look_alike_and_rich_stays_out():
    lines, rich_loaded = _run()
    assert re.fullmatch(STAMP + r" \[info\s*\] proxy listening on 127\.0\.0\.1:8868 \(static\) \[pdsupervisor\.proxy\]",
                        lines[0]), lines
    assert re.fullmatch(STAMP + r" \[info\s*\] sim engine m \(kv_role=None\) listening on :::1 \[pdsupervisor\.simengine\]",
                        lines[1]), lines
    assert re.fullmatch(STAMP + r" \[info\s*\] rest api listening\s+url=http://127\.0\.0\.1:8470", lines[2]), lines
    assert re.fullmatch(STAMP + r" \[error\s*\] membership watch failed\s+\[pdsupervisor\.proxy\.etcd\]", lines[3]), lines
    assert lines[4] == "Traceback (most recent call last):" and lines[-1] == "ZeroDivisionError: division by zero"
    assert not any("below the level" in line for line in lines)
    assert rich_loaded == "False"  # structlog was imported with rich hidden: plain tracebacks, less RSS


def test_the_benches_read_the_listening_lines(tmp_path):
    spec = importlib.util.spec_from_file_location("_localbench", ROOT / "bench" / "_localbench.py")
    assert spec is not None and spec.loader is not None
    localbench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localbench)
    before = time.time()
    lines, _ = _run()
    log = tmp_path / "engine.log"
    log.write_text("\n".join(lines) + "\n")
    times = localbench.engine_listen_times(log)
    assert len(times) == 2 and all(before - 1 <= t <= time.time() for t in times), (times, lines)
