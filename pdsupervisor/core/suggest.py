"""'Did you mean' for an unknown key: the closest field name of the section it was found in.

A pydantic error's location (`("prefill", "bse_port")`) is followed through the model's
types (fields, mapping values, list items, a tagged union's members) to the section the key
was in; `difflib` picks the closest of that section's field names.
"""

from __future__ import annotations

import difflib
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _inner(tp: Any, part: Any) -> list[Any]:
    """The type found under `part` (a field, a mapping key, a list index, a union's tag) of `tp`,
    then, for a tagged union, its other members: the key that picks one may be the misspelt one."""
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if _is_model(tp):
        found = tp.model_fields.get(part)
        return [found.annotation] if found is not None else []
    if origin is dict:
        return [get_args(tp)[1]]
    if origin is list:
        return [get_args(tp)[0]]
    if origin in (Union, UnionType):
        members = get_args(tp)
        tagged = [a for a in members if any(getattr(m, "tag", None) == part for m in getattr(a, "__metadata__", ()))]
        if tagged:
            return tagged + [a for a in members if a not in tagged]
        models = [a for a in map(_unwrap, members) if _is_model(a)]
        return _inner(models[0], part) if len(models) == 1 else []
    return []


def unknown_field(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The problem of an unknown key at `loc` (a validation error's, from `model`), with the
    closest field name of the section it is in."""
    sections: list[Any] = [model]
    for part in loc[:-1]:
        sections = _inner(sections[0], part) if sections else []
    known = [name for t in map(_unwrap, sections) if _is_model(t) for name in t.model_fields]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.7) if loc else []
    return f"unknown field; did you mean `{close[0]}`?" if close else "unknown field"
