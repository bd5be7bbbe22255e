"""Bounded spec input: every out-of-range value is a SpecError naming its field, and a spec
whose assignments would not fit in one etcd request is refused at submit."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from pdsupervisor.core import limits
from pdsupervisor.core.models import NodeAssignment, ProcessSpec
from pdsupervisor.core.planner import plan_cluster
from pdsupervisor.core.sizing import plan_size_problems, trial_members, write_size_problems
from pdsupervisor.core.spec import SpecError, load_spec, validate_spec
from tests.unit.test_spec import EXAMPLE, doc

WEEK = limits.MAX_DURATION_S


def problems(mutate) -> list[tuple[str, str]]:
    d = doc()
    mutate(d)
    with pytest.raises(SpecError) as err:
        validate_spec(d)
        load_spec(json.dumps(d))  # the submit path: only reached when the document itself is fine
    return err.value.problems


def named(mutate, field: str, why: str = "") -> None:
    got = problems(mutate)
    assert any(p == field and why in w for p, w in got), got


def accepted(mutate) -> None:
    d = doc()
    mutate(d)
    load_spec(json.dumps(d))


def put(path: str, value):
    """A mutation setting the dotted `path` of the document."""
    def mutate(d):
        *parents, last = path.split(".")
        for part in parents:
            d = d.setdefault(part, {})
        d[last] = value
    return mutate


def yaml_with(path: str, literal: str) -> str:
    """The example spec with `path` set to a YAML literal (e.g. `.nan`, `.inf`)."""
    d = doc()
    put(path, "@@")(d)
    return json.dumps(d).replace('"@@"', literal)


@pytest.mark.parametrize("ttl", [1, 0, -5, 301, 3600])
def test_lease_ttl_is_within_etcds_practical_range(ttl):
    named(put("policy.lease_ttl_s", ttl), "policy.lease_ttl_s")


@pytest.mark.parametrize("ttl", [2, 10, 300])
def test_lease_ttl_bounds_are_inclusive(ttl):
    accepted(put("policy.lease_ttl_s", ttl))


FLOATS = ["policy.restart.initial_backoff_s", "policy.restart.max_backoff_s", "policy.restart.multiplier",
          "policy.restart.jitter", "policy.restart.reset_after_s", "policy.start_timeout_s",
          "prefill.readiness.period_s", "decode.readiness.timeout_s", "decode.readiness.start_timeout_s",
          "prefill.stop_timeout_s", "mooncake.readiness_timeout_s", "proxy.start_timeout_s"]


@pytest.mark.parametrize("path", FLOATS)
@pytest.mark.parametrize("literal", [".nan", ".inf", "-.inf", "1e400"])
def test_floats_are_finite_everywhere(path, literal):
    with pytest.raises(SpecError) as err:
        load_spec(yaml_with(path, literal))
    assert any(p == path and "finite number" in w for p, w in err.value.problems), err.value.problems


@pytest.mark.parametrize("path", [p for p in FLOATS if p.endswith("_s")])
def test_durations_are_at_most_a_week(path):
    named(put(path, WEEK + 1), path, "less than or equal to 604800")
    accepted(put(path, WEEK))


@pytest.mark.parametrize("path", ["etcd.client_port", "etcd.peer_port", "mooncake.port", "prefill.base_port",
                                  "decode.base_port", "decode.dp_master_port", "proxy.port"])
@pytest.mark.parametrize("port", [0, -1, 65536])
def test_ports_are_1_to_65535(path, port):
    named(put(path, port), path)


@pytest.mark.parametrize(
    "path, value",
    [
        ("prefill.nodes", limits.MAX_NODES + 1),
        ("decode.slots", limits.MAX_SLOTS + 1),  # so engines per node stay <= MAX_SLOTS
        ("decode.tp", limits.MAX_SLOTS + 1),
        ("decode.ep_size", limits.MAX_NODES * limits.MAX_SLOTS + 1),
        ("mooncake.max_threads", limits.MAX_THREADS + 1),
        ("mooncake.global_segment_size", limits.MAX_BYTES_SIZE + 1),
        ("mooncake.local_buffer_size", limits.MAX_BYTES_SIZE + 1),
        ("benchmark.decode_batch_size", limits.MAX_BATCH + 1),
        ("host_requirements.hugepages", limits.MAX_HUGEPAGES + 1),
    ],
)
def test_counts_and_sizes_are_bounded(path, value):
    named(put(path, value), path, "less than or equal to")


@pytest.mark.parametrize(
    "path, items",
    [
        ("decode.argv", ["x"] * (limits.MAX_ARGS + 1)),
        ("proxy.argv", ["x"] * (limits.MAX_ARGS + 1)),
        ("proxy.extra_args", ["x"] * (limits.MAX_ARGS + 1)),
        ("proxy.first_token_args", ["x"] * (limits.MAX_ARGS + 1)),
        ("proxy.benchmark_args", ["x"] * (limits.MAX_ARGS + 1)),
        ("mooncake.extra_args", ["x"] * (limits.MAX_ARGS + 1)),
        ("mooncake.gc_args", ["x"] * (limits.MAX_ARGS + 1)),
        ("mooncake.rdma_devices", ["x"] * (limits.MAX_LABELS + 1)),
        ("prefill.node_names", [f"n{i}" for i in range(limits.MAX_NODES + 1)]),
        ("policy.spare_nodes", [f"s{i}" for i in range(limits.MAX_NODES + 1)]),
        ("etcd.endpoints", [f"h{i}:2379" for i in range(limits.MAX_ENDPOINTS + 1)]),
        ("engine_env", {f"V{i}": "x" for i in range(limits.MAX_ENV + 1)}),
        ("decode.env", {f"V{i}": "x" for i in range(limits.MAX_ENV + 1)}),
        ("proxy.env", {f"V{i}": "x" for i in range(limits.MAX_ENV + 1)}),
        ("benchmark.engine_env", {f"V{i}": "x" for i in range(limits.MAX_ENV + 1)}),
        ("prefill.labels", {f"k{i}": "v" for i in range(limits.MAX_LABELS + 1)}),
    ],
)
def test_lists_and_mappings_are_bounded(path, items):
    named(put(path, items), path, "at most")


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("model", "m" * (limits.MAX_STRING + 1), "model"),
        ("decode.argv", ["a" * (limits.MAX_STRING + 1)], "decode.argv[0]"),
        ("engine_env", {"X": "v" * (limits.MAX_STRING + 1)}, "engine_env.X"),
        ("engine_env", {"X" * (limits.MAX_STRING + 1): "v"}, "engine_env"),  # a key: named by its mapping
        ("proxy.cwd", "/" + "d" * limits.MAX_STRING, "proxy.cwd"),
        ("prefill.node_names", ["n" * (limits.MAX_STRING + 1)], "prefill.node_names[0]"),
    ],
)
def test_strings_are_bounded(path, value, field):
    got = problems(put(path, value))
    assert any(p.startswith(field) and f"at most {limits.MAX_STRING} characters" in w for p, w in got), got


def test_an_inline_chat_template_sized_string_is_fine():
    accepted(put("decode.argv", ["python3", "--chat-template", "{%- x -%}" * 1500]))


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("decode.argv", ["python3", "a\0b"], "decode.argv[1]"),
        ("model", "m\0", "model"),
        ("engine_env", {"X": "a\0"}, "engine_env.X"),
        ("prefill.labels", {"k\0": "v"}, "prefill.labels"),
        ("proxy.cwd", "/x\0", "proxy.cwd"),
    ],
)
def test_no_string_holds_a_nul(path, value, field):
    named(put(path, value), field, "NUL")


@pytest.mark.parametrize("path", ["prefill.readiness.path", "decode.readiness.path", "proxy.readiness_path"])
@pytest.mark.parametrize("value", ["/health HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /", "/health\n", "/a b", "health"])
def test_readiness_paths_are_request_paths(path, value):
    named(put(path, value), path, "is not a request path")


@pytest.mark.parametrize("path", ["prefill.readiness.path", "decode.readiness.path", "proxy.readiness_path"])
def test_usual_readiness_paths_are_fine(path):
    for value in ("/health", "/v1/models", "/health?verbose=1"):
        accepted(put(path, value))


@pytest.mark.parametrize("path", ["engine_env", "prefill.env", "decode.env", "proxy.env", "benchmark.engine_env"])
@pytest.mark.parametrize("name", ["1X", "A-B", "A B", "A=B", ""])
def test_env_names_are_identifiers(path, name):
    named(put(path, {name: "v"}), path, "is not an environment variable name")


def test_dp_env_names_are_identifiers():
    named(put("decode.dp_env", {"rank": "VLLM-DP-RANK"}), "decode.dp_env.rank", "should match pattern")


# ---- the assignments must fit in one etcd request -------------------------------------------


def test_the_shipped_specs_fit_with_room_to_spare():
    for name in ("cluster.example.yaml", "demo.yaml"):
        spec = load_spec((EXAMPLE.parent / name).read_text())
        plan = plan_cluster(spec, trial_members(spec))
        total = sum(len(NodeAssignment(node=n, processes=[p]).model_dump_json()) for n, p in plan.assignable())
        assert total < limits.MAX_WRITE_BYTES / 20


def _huge_argv(d):
    d["decode"]["argv"] = d["decode"]["argv"] + ["--x", "a" * 10_000] * 16  # 160 KB per decode engine, 8 a node


def _huge_env(d):
    d["engine_env"].update({f"V{i}": "b" * 1000 for i in range(160)})  # 160 KB per engine, 8 a node


@pytest.mark.parametrize("mutate, field", [(_huge_argv, "decode.argv"), (_huge_env, "engine_env")])
def test_a_spec_whose_assignment_would_not_fit_is_refused_naming_the_field(mutate, field):
    d = doc()
    mutate(d)
    validate_spec(d)  # every value on its own is fine...
    ((path, why),) = problems(mutate)  # ... but not one node's assignment in one etcd request
    assert path == field
    assert "the assignment of g1" in why and "(8 engines)" in why
    assert "over the 1.00 MiB allowed" in why and "etcd refuses requests over 1.50 MiB" in why
    assert f"{field} makes " in why


def test_many_nodes_fit_however_many_there_are():
    """Written in chunks, one node's assignment at a time at least: only its own size counts."""
    d = doc()
    d["decode"] = {**d["decode"], "nodes": limits.MAX_NODES, "node_names": []}
    d["decode"].pop("ep_size")
    spec = validate_spec(d)
    plan = plan_cluster(spec, trial_members(spec))
    total = sum(len(NodeAssignment(node=n, processes=[p]).model_dump_json()) for n, p in plan.assignable())
    assert total > 4 * limits.ETCD_MAX_REQUEST_BYTES  # far more than one request ever took
    assert plan_size_problems(spec, plan) == []


def test_the_trial_plan_places_count_based_roles_with_their_labels():
    d = doc()
    d["prefill"] = {**d["prefill"], "node_names": [], "nodes": 2, "labels": {"pool": "p"}}
    d["decode"] = {**d["decode"], "node_names": [], "nodes": 3, "labels": {"pool": "d"}}
    d["decode"].pop("ep_size")
    d["etcd"] = {"bootstrap_node": "etcd-host"}
    spec = validate_spec(d)
    plan = plan_cluster(spec, trial_members(spec))
    assert len(plan.placement["prefill"]) == 2 and len(plan.placement["decode"]) == 3
    assert plan_size_problems(spec, plan) == []


def test_a_spec_that_cannot_be_placed_is_not_measured():
    d = doc()
    d["proxy"]["port"] = d["prefill"]["base_port"]  # a port clash on g10: trial_checks reports it instead
    _huge_argv(d)
    assert write_size_problems(validate_spec(d)) == []


# ---- what an agent reads from etcd is bounded the same way ------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"stop_timeout_s": math.inf}, {"start_timeout_s": math.nan}, {"stop_timeout_s": WEEK + 1},
        {"port": 0}, {"port": 65536}, {"readiness": {"port": 70000}},
        {"readiness": {"port": 80, "period_s": math.inf}}, {"restart": {"max_backoff_s": math.nan}},
        {"restart": {"multiplier": 1000}},
    ],
)
def test_an_assigned_process_is_bounded_too(fields):
    with pytest.raises(ValidationError):
        ProcessSpec(name="p", role="decode", argv=["x"], **fields)
    with pytest.raises(ValidationError):  # as an agent reads it: JSON, where NaN and Infinity parse
        body = json.dumps({"name": "p", "role": "decode", "argv": ["x"], **fields})
        NodeAssignment.model_validate_json(f'{{"node": "n", "processes": [{body}]}}')
