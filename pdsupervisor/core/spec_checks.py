"""Checks of the whole spec document that agents would otherwise make too late, one process
at a time (`admission`): a NUL in any string, an env name that is not an identifier.

They read the validated spec as JSON (`ClusterSpec.model_dump(mode="json")`) and return
(field path, why) pairs, like every spec check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdsupervisor.core.admission import ENV_NAME_PATTERN, ENV_NAME_RE, show

ENV_FIELDS = ("engine_env", "prefill.env", "decode.env", "proxy.env", "benchmark.engine_env")


def nul_problems(value: Any, path: str = "spec") -> list[tuple[str, str]]:
    """Every string (mapping keys too) holding a NUL: no argv item, env value or path can."""
    if isinstance(value, str):
        return [(path, "contains a NUL byte")] if "\0" in value else []
    problems: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if "\0" in key:
                problems.append((path, f"key {show(key)} contains a NUL byte"))
            else:
                problems += nul_problems(item, f"{path}.{key}" if path != "spec" else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += nul_problems(item, f"{path}[{i}]")
    return problems


def env_name_problems(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for field in ENV_FIELDS:
        section: Any = doc
        for part in field.split("."):
            section = section.get(part) or {}
        for name in section:
            if "\0" not in name and not ENV_NAME_RE.match(name):
                problems.append((field, f"{show(name)} is not an environment variable name ({ENV_NAME_PATTERN})"))
    return problems


def document_problems(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    return nul_problems(doc) + env_name_problems(doc)
