"""The OpenAPI description every agent serves at `GET /openapi.yaml`.

The paths are written here by hand; the schemas are generated from the document models
(`pdsupervisor.core.documents`) the routes serialize and the client reads, so the
description cannot drift from what is served. `python -m pdsupervisor.api.openapi` prints it.
"""

from __future__ import annotations

import functools
from typing import Any

import yaml
from pydantic.json_schema import models_json_schema

from pdsupervisor.core.documents import DOCUMENTS

REF = "#/components/schemas/{model}"


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}}


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description)


_UNAUTHORIZED = _error("no credential: bearer token missing or wrong, and no verified client certificate")
_FORBIDDEN = _error("a foreign Origin (a browser's cross-site request), or, on an agent without credentials, "
                    "a Host that is not a loopback address")
_ETCD_AWAY = _error("etcd unavailable")
_CREDENTIAL: list[dict[str, list[str]]] = [{"bearer": []}, {"clientCertificate": []}]  # either one

PATHS: dict[str, Any] = {
    "/cluster/start": {"post": {
        "summary": "Run a cluster spec (YAML or JSON body, at most 1 MiB, nested at most 32 levels).",
        "security": _CREDENTIAL,
        "parameters": [{"name": "replace", "in": "query", "schema": {"type": "boolean"},
                        "description": "replace a running spec"}],
        "requestBody": {"required": True, "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/x-yaml": {"schema": {"type": "string"}},
            "text/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        }},
        "responses": {
            "202": _json("SubmitAnswer", "accepted (recorded as an `audit` event)"),
            "400": _error("invalid spec, or nested too deeply; nothing changed"),
            "401": _UNAUTHORIZED,
            "403": _FORBIDDEN,
            "409": _error("another spec is running"),
            "413": _error("body larger than 1 MiB"),
            "415": _error("body not JSON or YAML"),
            "503": _ETCD_AWAY,
        },
    }},
    "/cluster/stop": {"post": {
        "summary": "Ordered stop (proxy, engines, master). No body.",
        "security": _CREDENTIAL,
        "responses": {"202": _json("SubmitAnswer", "accepted (recorded as an `audit` event)"),
                      "401": _UNAUTHORIZED, "403": _FORBIDDEN, "503": _ETCD_AWAY},
    }},
    "/cluster": {"get": {
        "summary": "Phase, what is missing, and every process.",
        "responses": {"200": _json("ClusterDocument", "the cluster"), "503": _ETCD_AWAY},
    }},
    "/nodes": {"get": {
        "summary": "Registered members and their facts.",
        "responses": {"200": _json("NodesDocument", "members"), "503": _ETCD_AWAY},
    }},
    "/events": {"get": {
        "summary": "Recent events (member joined/lost, process restarted, proxy released, leader changed, "
                   "audit: an accepted write, its caller and address).",
        "parameters": [{"name": "limit", "in": "query",
                        "schema": {"type": "integer", "default": 100, "minimum": 1, "maximum": 1000}}],
        "responses": {
            "200": _json("EventsDocument", "events"),
            "400": _error("limit is not a whole number from 1 to 1000"),
            "503": _ETCD_AWAY,
        },
    }},
    "/etcd": {"get": {
        "summary": "etcd's own members: each one up or not, the raft leader, database size, raft term and index. "
                   "Answered without a quorum too (each member's status is its own).",
        "responses": {"200": _json("EtcdDocument", "members"), "503": _ETCD_AWAY},
    }},
    "/etcd/replace-member": {"post": {
        "summary": "Remove a dead etcd member and add a new one in its place (README: Replacing a dead etcd member). "
                   "Refused unless the member is down and the members up keep a quorum through the change.",
        "security": _CREDENTIAL,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": REF.format(model="ReplaceRequest")}}}},
        "responses": {
            "200": _json("MemberReplaced", "done (recorded as an `audit` event): start the new member's agent "
                                           "with this member list and initial_cluster_state existing"),
            "400": _error("invalid request; nothing changed"),
            "401": _UNAUTHORIZED,
            "403": _FORBIDDEN,
            "409": _error("not safe now (the member is up, no leader, or the quorum would be lost); nothing changed"),
            "415": _error("body not JSON"),
            "503": _ETCD_AWAY,
        },
    }},
    "/healthz": {"get": {"summary": "The agent is alive (liveness): {ok, name, registered, etcd_reachable, ready}, "
                                    "200 registered or not.", "responses": {"200": {"description": "alive"}}}},
    "/readyz": {"get": {"summary": "The agent is a member of the cluster (readiness): registered under a lease "
                                   "confirmed within its TTL. The body of /healthz.",
                        "responses": {"200": {"description": "ready"},
                                      "503": {"description": "not registered, or etcd not reached within the TTL"}}}},
    "/status": {"get": {"summary": "This node's facts and processes.",
                        "responses": {"200": {"description": "node status"}}}},
    "/metrics": {"get": {
        "summary": "This agent's Prometheus metrics: processes, registration, etcd, coordinator (README, Metrics).",
        "responses": {"200": {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
    "/logs/{process}": {"get": {
        "summary": "Tail of a process's log on this node (follow=1 streams). Needs a credential: logs hold secrets.",
        "security": _CREDENTIAL,
        "parameters": [
            {"name": "process", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "tail", "in": "query", "schema": {"type": "integer", "default": 100, "minimum": 0,
                                                        "maximum": 100000}},
            {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
        ],
        "responses": {
            "200": {"description": "log text", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "400": _error("tail is not a whole number from 0 to 100000"),
            "401": _UNAUTHORIZED,
            "403": _FORBIDDEN,
            "404": _error("no such process"),
        },
    }},
    "/openapi.yaml": {"get": {"summary": "This document.", "responses": {"200": {"description": "OpenAPI document"}}}},
}


def schemas() -> dict[str, Any]:
    """Every document model's JSON schema, and the models they nest, by model name.

    Pydantic puts nested models under `$defs`; for several models at once it puts them all
    there, with references already pointing at `components/schemas`.
    """
    _, top = models_json_schema([(m, "validation") for m in DOCUMENTS], ref_template=REF)
    return dict(sorted(top["$defs"].items()))


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",  # 3.1: its schemas are JSON Schema, as pydantic writes them
        "info": {
            "title": "pdsupervisor cluster API",
            "version": "1",
            "description": (
                "Served by every pd-agent. Writes record desired state in etcd; the elected coordinator\n"
                "acts on it. Reads come from etcd, so any agent answers them and need no credential.\n"
                "Writes and process logs need one: `Authorization: Bearer <token>` (the agent's\n"
                "rest.token_file) or a client certificate signed by its rest.tls_client_ca. An agent\n"
                "without either listens on loopback only. Requests needing a credential are refused\n"
                "with a foreign `Origin` (403); write bodies are JSON or YAML (415), at most 1 MiB (413).\n"
                "Every error answer is an ErrorBody; a bad field is named in its `problems`.\n"
            ),
        },
        "servers": [{"url": "http://127.0.0.1:8470"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "clientCertificate": {"type": "mutualTLS"}},
            "schemas": schemas(),
        },
        "paths": PATHS,
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a response used twice is written out twice, not as a YAML anchor


@functools.cache
def openapi_yaml() -> str:
    return yaml.dump(openapi_document(), Dumper=_Dumper, sort_keys=False, width=120)


if __name__ == "__main__":
    print(openapi_yaml(), end="")
