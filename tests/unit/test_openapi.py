"""The OpenAPI description: valid OpenAPI 3.1, its schemas the document models' own."""

from __future__ import annotations

import yaml
from openapi_spec_validator import validate

from pdsupervisor.api.openapi import REF, openapi_document, openapi_yaml
from pdsupervisor.core.documents import DOCUMENTS, ClusterDocument, ErrorBody, Event, EventsDocument, NodesDocument
from pdsupervisor.core.models import NodeFacts
from tests.openapi_helpers import check_served, response_schema, schema_errors


def test_the_description_is_valid_openapi():
    doc = openapi_document()
    validate(doc)
    assert yaml.safe_load(openapi_yaml()) == doc  # what `GET /openapi.yaml` serves


def test_the_schemas_are_each_models_json_schema_hoisted():
    schemas = openapi_document()["components"]["schemas"]
    for model in DOCUMENTS:
        own = model.model_json_schema(ref_template=REF)
        nested = own.pop("$defs", {})
        assert schemas[model.__name__] == own
        assert {name: schemas[name] for name in nested} == nested
    assert set(schemas) == {m.__name__ for m in DOCUMENTS} | {"ProcessRow", "NodeFacts", "RdmaDevice", "RdmaPort",
                                                             "Event", "FieldProblem", "EtcdAccess", "TlsFiles",
                                                             "RolloutDocument", "RolloutRole", "EtcdMember"}


def test_every_json_answer_names_a_schema_it_has():
    openapi = openapi_document()
    named = {response_schema(openapi, path, method, int(status))
             for path, ops in openapi["paths"].items() for method, op in ops.items()
             for status, answer in op["responses"].items() if "application/json" in answer.get("content", {})}
    assert named == {"ClusterDocument", "NodesDocument", "EventsDocument", "SubmitAnswer", "ErrorBody", "EtcdDocument",
                     "MemberReplaced"}
    assert named <= set(openapi["components"]["schemas"])


def test_error_body_leaves_out_what_does_not_apply():
    openapi = openapi_document()
    assert ErrorBody(error="etcd is unavailable: x").served() == {"error": "etcd is unavailable: x"}
    refused = ErrorBody(error="running", generation=3, message="running").served()
    assert list(refused) == ["error", "generation", "message"]
    check_served(openapi, "ErrorBody", refused)
    assert schema_errors(openapi, "ErrorBody", {"error": "x", "generation": None}) != []  # left out, never null


def test_events_keep_their_own_fields_and_nodes_their_facts():
    openapi = openapi_document()
    event = {"ts": 1.5, "kind": "member", "message": "n1 joined", "node": "n1"}
    served = EventsDocument(events=[Event.model_validate(event)]).model_dump(mode="json")
    assert served == {"events": [event]}
    check_served(openapi, "EventsDocument", served)
    facts = NodeFacts(name="n1", ip="10.0.0.1", labels={"rack": "a"})
    nodes = NodesDocument(leader="n1", nodes=[facts]).model_dump(mode="json")
    assert nodes == {"leader": "n1", "nodes": [facts.model_dump(mode="json")]}
    check_served(openapi, "NodesDocument", nodes)
    assert schema_errors(openapi, "NodesDocument", {"leader": None, "nodes": [{"name": "n1"}]}) != []


def test_a_field_a_newer_agent_adds_is_ignored_not_refused():
    """A CLI of the previous release keeps reading the documents of agents already upgraded."""
    served = {"cluster": "c", "generation": 1, "action": "start", "phase": "ready", "leader": "n1", "missing": [],
              "problems": [], "start_timed_out": False, "members": ["n1"], "placement": {}, "proxy_url": None,
              "processes": [], "added_in_a_later_release": {"x": 1}}
    doc = ClusterDocument.model_validate(served)
    assert doc.phase == "ready" and "added_in_a_later_release" not in doc.model_dump()
