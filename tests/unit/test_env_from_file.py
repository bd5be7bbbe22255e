"""Secrets stay out of etcd: `{file: PATH}` and `{credential: NAME}` env values are carried
as where to read them, through the spec, the plan and the assignment, never rendered."""

from __future__ import annotations

import json

import pytest
import yaml

from pdsupervisor.core.models import EnvFromCredential, EnvFromFile, NodeAssignment, ProcessSpec
from pdsupervisor.core.planner import plan_cluster
from pdsupervisor.core.spec import SpecError, validate_spec
from tests.unit.test_planner import EXAMPLE, seed_nodes

TOKEN = {"file": "/etc/pdsupervisor/hf_token"}


def doc(**changes) -> dict:
    d = yaml.safe_load(EXAMPLE.read_text())
    d.update(changes)
    return d


def test_the_shipped_example_reads_hf_token_from_a_file():
    spec = validate_spec(doc())
    assert spec.engine_env["HF_TOKEN"] == EnvFromFile(file="/etc/pdsupervisor/hf_token")


def test_engine_and_role_env_values_may_be_files_or_credentials():
    d = doc(engine_env={"HF_TOKEN": TOKEN, "PLAIN": "x"})
    d["decode"]["env"] = {"API_KEY": {"credential": "decode_key"}, "HF_TOKEN": {"file": "/run/other"}}
    spec = validate_spec(d)
    plan = plan_cluster(spec, seed_nodes())
    for _, p in plan.engines():
        assert p.env["PLAIN"] == "x"
        if p.role == "prefill":
            assert p.env["HF_TOKEN"] == EnvFromFile(file="/etc/pdsupervisor/hf_token")
            assert "API_KEY" not in p.env
        else:  # the role's env wins over engine_env, as for plain values
            assert p.env["HF_TOKEN"] == EnvFromFile(file="/run/other")
            assert p.env["API_KEY"] == EnvFromCredential(credential="decode_key")
    # what the coordinator writes to etcd: the path, in the same shape as the spec
    _, prefill = next((n, p) for n, p in plan.engines() if p.role == "prefill")
    written = json.loads(NodeAssignment(node="g10", processes=[prefill]).model_dump_json())
    assert written["processes"][0]["env"]["HF_TOKEN"] == TOKEN
    assert NodeAssignment.model_validate(written).processes[0] == prefill


def test_placeholders_are_not_rendered_in_a_path():
    d = doc(engine_env={"HF_TOKEN": {"file": "/etc/{node}/{bogus}"}})
    plan = plan_cluster(validate_spec(d), seed_nodes())  # {bogus} is no error: never rendered
    assert {p.env["HF_TOKEN"] for _, p in plan.engines()} == {EnvFromFile(file="/etc/{node}/{bogus}")}


def test_the_spec_hash_covers_the_path_not_the_content():
    def spec(env) -> ProcessSpec:
        return ProcessSpec(name="p", role="decode", argv=["x"], env=env)

    same = spec({"HF_TOKEN": TOKEN})
    assert same.spec_hash() == spec({"HF_TOKEN": dict(TOKEN)}).spec_hash()
    assert same.spec_hash() != spec({"HF_TOKEN": {"file": "/etc/pdsupervisor/hf_token2"}}).spec_hash()
    assert same.spec_hash() != spec({"HF_TOKEN": "/etc/pdsupervisor/hf_token"}).spec_hash()  # a value is not a file


@pytest.mark.parametrize(
    "value, field, why",
    [
        ({"file": "hf_token"}, "engine_env.HF_TOKEN.file", "must be an absolute path"),
        ({"file": "/a\0b"}, "engine_env.HF_TOKEN.file", "must be an absolute path"),
        ({"file": "/" + "x" * 5000}, "engine_env.HF_TOKEN.file", "at most 4096 characters"),
        ({}, "engine_env.HF_TOKEN.file", "Field required"),
        ({"file": "/a", "mode": 1}, "engine_env.HF_TOKEN.mode", "unknown field"),
        ({"file": "/a", "credential": "b"}, "engine_env.HF_TOKEN.file", "unknown field"),
        ({"credential": "../hf_token"}, "engine_env.HF_TOKEN.credential", "should match pattern"),
        ({"credential": "a/b"}, "engine_env.HF_TOKEN.credential", "should match pattern"),
        ({"credential": ""}, "engine_env.HF_TOKEN.credential", "should match pattern"),
        (5, "engine_env.HF_TOKEN", "Input should be a valid string"),
        (["x"], "engine_env.HF_TOKEN", "Input should be a valid string"),
    ],
)
def test_a_bad_env_source_is_named(value, field, why):
    with pytest.raises(SpecError) as err:
        validate_spec(doc(engine_env={"HF_TOKEN": value}))
    assert any(f == field and why in w for f, w in err.value.problems), err.value.problems


def test_a_bad_role_env_source_is_named():
    d = doc()
    d["prefill"]["env"] = {"T": {"file": "rel"}}
    with pytest.raises(SpecError) as err:
        validate_spec(d)
    assert ("prefill.env.T.file", "Value error, must be an absolute path") in err.value.problems
