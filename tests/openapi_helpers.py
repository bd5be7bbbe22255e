"""Served JSON against an OpenAPI description: JSON Schema validation with the document's own
`$ref`s resolved, and every key of every object listed by its schema."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

URI = "urn:pdsupervisor:openapi"


def response_schema(openapi: dict[str, Any], path: str, method: str, status: int) -> str:
    """The component name of the JSON schema `openapi` gives for that answer."""
    answer = openapi["paths"][path][method]["responses"][str(status)]
    return str(answer["content"]["application/json"]["schema"]["$ref"]).rsplit("/", 1)[-1]


def schema_errors(openapi: dict[str, Any], name: str, value: Any) -> list[str]:
    registry = Registry().with_resource(URI, Resource.from_contents(openapi, default_specification=DRAFT202012))
    validator = Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in validator.iter_errors(value)]


def unlisted(openapi: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """Keys of `value`, at any depth, that its schema does not list (unless it allows any)."""
    if not isinstance(value, dict | list):
        return []
    if "$ref" in schema:
        return unlisted(openapi, openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]], value, where)
    for branch in schema.get("anyOf", []):
        if isinstance(value, list) == (branch.get("type") == "array") and branch.get("type") != "null":
            return unlisted(openapi, branch, value, where)
    out: list[str] = []
    if isinstance(value, list):
        for i, item in enumerate(value):
            out += unlisted(openapi, schema.get("items", {}), item, f"{where}[{i}]")
        return out
    props: dict[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    for key, item in value.items():
        if key in props:
            out += unlisted(openapi, props[key], item, f"{where}.{key}")
        elif isinstance(extra, dict):
            out += unlisted(openapi, extra, item, f"{where}.{key}")
        elif extra is not True:
            out.append(f"{where}.{key}")
    return out


def check_served(openapi: dict[str, Any], name: str, value: Any) -> None:
    """`value` is a `name` document by `openapi`'s schemas, and they list each of its fields."""
    assert schema_errors(openapi, name, value) == [], (name, value)
    assert unlisted(openapi, openapi["components"]["schemas"][name], value) == [], (name, value)
