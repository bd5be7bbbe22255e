"""One logging setup for every daemon here (pd-agent, the proxy, the sim engine).

key=value lines on stderr, rendered by structlog's console renderer (journald or the agent's
log files add the rest). structlog loggers (the agent's) print straight through structlog;
stdlib loggers (the proxy's and the sim engine's, aiohttp's, asyncio's) go through one root
handler whose `ProcessorFormatter` renders them the same way, with the logger's name:

    2026-05-09T07:35:25.123456 [info     ] proxy listening on 0.0.0.0:8868 (static) [pdsupervisor.proxy]
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType


def _import_structlog_without_rich() -> ModuleType:
    """structlog renders exceptions with rich when it can import it: boxed tracebacks in
    journald and about 4 MB more RSS for a daemon that should stay small. Hide rich while
    structlog loads (plain tracebacks); later imports of rich (CLI code) are unaffected."""
    if "structlog" in sys.modules:
        return sys.modules["structlog"]
    hidden = {m: sys.modules.get(m) for m in ("rich", "better_exceptions")}
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail
    try:
        import structlog
    finally:
        for m, was in hidden.items():
            if was is None:
                del sys.modules[m]
            else:
                sys.modules[m] = was
    return structlog


structlog = _import_structlog_without_rich()


def configure_logging(level: str) -> None:
    """structlog, key=value lines on stderr; stdlib logging rendered alike, at the same level."""
    threshold = logging.getLevelName(level.upper())
    stamp = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
    ]
    renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*stamp, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*stamp, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
