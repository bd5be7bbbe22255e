"""Spec validation: every error names its field and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pdsupervisor.cli.main import main
from pdsupervisor.core.spec import SpecError, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc/pdsupervisor/cluster.example.yaml"


def doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def problems_of(mutate) -> list[tuple[str, str]]:
    d = doc()
    mutate(d)
    with pytest.raises(SpecError) as err:
        validate_spec(d)
    return err.value.problems


def test_shipped_specs_are_valid():
    for name in ("cluster.example.yaml", "demo.yaml"):
        assert load_spec((ROOT / "etc/pdsupervisor" / name).read_text()).cluster


@pytest.mark.parametrize(
    "mutate, field, why",
    [
        (lambda d: d["decode"].update(tp=3), "decode.tp", "decode.slots (8) is not divisible by decode.tp (3)"),
        (lambda d: d["decode"].update(ep_size=8), "decode.ep_size", "8 is not consistent with 2 decode nodes x 8 slots"),
        (lambda d: d["decode"].update(nodes=3), "decode.nodes", "3 but node_names lists 2"),
        (lambda d: d["decode"].pop("node_names"), "decode.nodes", "give a node count or node_names"),
        (lambda d: d["decode"].update(node_names=["g10", "g14"]), "decode.node_names", "g10 also listed under prefill"),
        (lambda d: d["prefill"].update(colour="red"), "prefill.colour", "unknown field"),
        (lambda d: d["decode"].update(tp="x"), "decode.tp", "Input should be a valid integer"),
        (lambda d: d["proxy"].update(port=70000), "proxy.port", "less than or equal to 65535"),
        (lambda d: d["proxy"].update(argv=[]), "proxy.argv", "required when proxy.kind is external"),
        (lambda d: d["decode"]["argv"].append("--x={bogus}"), f"decode.argv[{len(doc()['decode']['argv'])}]",
         "unknown placeholder {bogus}"),
        (lambda d: d["proxy"]["argv"].append("--d={decode_endpoints}"), f"proxy.argv[{len(doc()['proxy']['argv'])}]",
         "must stand alone"),
        (lambda d: d.update(etcd={}), "etcd", "give etcd.endpoints or etcd.bootstrap_node"),
        (lambda d: d.update(etcd={"endpoints": ["nohost"]}), "etcd.endpoints", "is not host:port"),
        (lambda d: d.pop("model"), "model", "Field required"),
        (lambda d: d["policy"].update(node_loss="panic"), "policy.node_loss", "Input should be 'wait' or 'replace'"),
        (lambda d: d["benchmark"].update(enabled=True, decode_batch_size=1), "benchmark.decode_batch_size", "at least 2"),
        (lambda d: d["policy"].update(node_loss="replace", spare_nodes=["g13"]), "policy.spare_nodes", "g13 already has a role"),
        (lambda d: d["mooncake"].update(metadata="10.0.0.9:2379"), "mooncake.metadata", "give p2p, master-http or a URL"),
        (lambda d: d["mooncake"].update(metadata="P2PHANDSHAKE"), "mooncake.metadata", "give p2p, master-http or a URL"),
        (lambda d: d["prefill"].update(readiness={"path": "/health\r\nX-Evil: 1"}), "prefill.readiness.path",
         "no space, CR, LF"),
        (lambda d: d["proxy"].update(readiness_path="health"), "proxy.readiness_path", "is not a request path"),
    ],
)
def test_bad_field_is_named(mutate, field, why):
    problems = problems_of(mutate)
    assert any(path == field and why in msg for path, msg in problems), problems


@pytest.mark.parametrize(
    "mutate, field, why",
    [
        (lambda d: d.update(modle="x"), "modle", "unknown field; did you mean `model`?"),
        (lambda d: d["prefill"].update(bse_port=8100), "prefill.bse_port", "unknown field; did you mean `base_port`?"),
        (lambda d: d["decode"].update(dp_env={"sise": "X"}), "decode.dp_env.sise", "did you mean `size`?"),
        (lambda d: d["policy"].update(restart={"max_backof_s": 3}), "policy.restart.max_backof_s",
         "did you mean `max_backoff_s`?"),
        (lambda d: d["prefill"].update(readiness={"pth": "/x"}), "prefill.readiness.pth", "did you mean `path`?"),
        # an env value's kind is picked by its keys: a misspelt key is matched against every kind's
        (lambda d: d.update(engine_env={"T": {"credentail": "hf"}}), "engine_env.T.credentail",
         "did you mean `credential`?"),
        (lambda d: d.update(engine_env={"T": {"credential": "hf", "fle": "/a"}}), "engine_env.T.fle",
         "did you mean `file`?"),
    ],
)
def test_an_unknown_key_gets_the_closest_field_name(mutate, field, why):
    problems = problems_of(mutate)
    assert any(path == field and why in msg for path, msg in problems), problems


def test_an_unknown_key_far_from_any_field_gets_no_guess():
    assert ("colour", "unknown field") in problems_of(lambda d: d.update(colour="red"))
    assert ("prefill.colour", "unknown field") in problems_of(lambda d: d["prefill"].update(colour="red"))


def test_several_problems_are_reported_together():
    def mutate(d):
        d["decode"]["tp"] = 3
        d["proxy"]["port"] = 0
    paths = {p for p, _ in problems_of(mutate)}
    assert paths == {"proxy.port"}  # type errors first: cross-field checks need a well-typed spec
    d = doc()
    d["decode"]["tp"] = 3
    d["prefill"]["tp"] = 5
    with pytest.raises(SpecError) as err:
        validate_spec(d)
    assert {p for p, _ in err.value.problems} == {"decode.tp", "prefill.tp"}


def test_not_yaml_and_not_mapping():
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec("a: [")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec("- 1")


def test_plan_command_json_and_errors(tmp_path):
    runner = CliRunner()
    nodes = ["--node", "g10=10.0.0.9,rdma=mlx5_0", "--node", "g13=10.0.0.81,label.pool=d", "--node", "g14=10.0.0.165"]
    result = runner.invoke(main, ["plan", "-f", str(EXAMPLE), *nodes, "-o", "json"])
    assert result.exit_code == 0, result.output
    import json
    plan = json.loads(result.stdout)
    assert set(plan["nodes"]) == {"g10", "g13", "g14"}
    roles = {p["role"] for n in plan["nodes"].values() for p in n["processes"]}
    assert roles == {"etcd", "mooncake-master", "prefill", "decode", "proxy"}
    first = plan["nodes"]["g13"]["processes"][0]
    assert {"name", "role", "argv", "env", "port"} <= set(first)
    assert plan["nodes"]["g10"]["mooncake_config"]["protocol"] == "rdma"

    table = runner.invoke(main, ["plan", "-f", str(EXAMPLE), *nodes])
    assert table.exit_code == 0 and "decode-7" in table.output and "10.0.0.165:8207" in table.output

    short = runner.invoke(main, ["plan", "-f", str(EXAMPLE), "--node", "g10=10.0.0.9"])
    assert short.exit_code == 2
    assert "decode.node_names: node g13 is not registered" in short.output

    bad = tmp_path / "bad.yaml"
    d = doc()
    d["decode"]["tp"] = 3
    bad.write_text(yaml.safe_dump(d))
    res = runner.invoke(main, ["plan", "-f", str(bad), *nodes])
    assert res.exit_code == 2 and "decode.tp: decode.slots (8) is not divisible by decode.tp (3)" in res.output

    # the example makes hugepages a hard requirement: a node short of them is flagged, the plan still shown
    short_pages = ["--node", "g10=10.0.0.9,hugepages=32768", "--node", "g13=10.0.0.81,hugepages=100",
                   "--node", "g14=10.0.0.165,hugepages=32768"]
    res = runner.invoke(main, ["plan", "-f", str(EXAMPLE), *short_pages, "-o", "json"])
    assert res.exit_code == 0 and "warning: g13: hugepages:" in res.stderr and "g14: hugepages" not in res.stderr
    assert json.loads(res.stdout)["nodes"]["g13"]

    res = runner.invoke(main, ["plan", "-f", str(EXAMPLE), "--node", "g10"])
    assert res.exit_code != 0 and "expected NAME=IP" in res.output


@pytest.mark.parametrize("command", [["plan"], ["doctor", "--root", "/nonexistent"]])
def test_an_invalid_spec_exits_2_from_every_command_that_reads_one(tmp_path, command):
    """`start` too, from the agent's 400: tests/component/test_api.py."""
    bad = tmp_path / "bad.yaml"
    d = doc()
    d["prefill"]["bse_port"] = 8100
    bad.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(main, [*command, "-f", str(bad)])
    assert res.exit_code == 2, res.output
    assert f"{bad}: invalid:" in res.output and "prefill.bse_port: unknown field; did you mean `base_port`?" in res.output
    unreadable = CliRunner().invoke(main, [*command, "-f", str(tmp_path / "absent.yaml")])
    assert unreadable.exit_code == 1 and "No such file or directory" in unreadable.output
