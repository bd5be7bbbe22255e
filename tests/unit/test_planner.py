"""The planner: golden values of the seed's layout, properties over many layouts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pdsupervisor.core.etcd_access import endpoint_url
from pdsupervisor.core.models import EtcdAccess, NodeFacts, RdmaDevice, RdmaPort, TlsFiles
from pdsupervisor.core.planner import PlanError, interleaved_decode_endpoints, plan_cluster, port_claims
from pdsupervisor.core.spec import load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc/pdsupervisor/cluster.example.yaml"
SEED_IPS = {"g10": "10.239.129.9", "g13": "10.239.129.81", "g14": "10.239.129.165"}


def facts(name: str, ip: str, **kw) -> NodeFacts:
    return NodeFacts(name=name, ip=ip, state_dir=f"/var/lib/pd/{name}", **kw)


def seed_nodes(**extra) -> dict[str, NodeFacts]:
    return {n: facts(n, ip, **extra) for n, ip in SEED_IPS.items()}


def example_doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_spec_reproduces_the_guide_layout():
    plan = plan_cluster(load_spec(EXAMPLE.read_text()), seed_nodes())
    g10, g13, g14 = (plan.nodes[n] for n in ("g10", "g13", "g14"))
    assert [p.role for p in g10.processes] == ["etcd", "mooncake-master", "prefill", "proxy"]
    prefill = g10.processes[2]
    assert prefill.port == 8100 and prefill.argv[prefill.argv.index("-tp") + 1] == "8"
    assert '{"kv_connector":"MooncakeStoreConnector","kv_role":"kv_producer"}' in prefill.argv
    assert "VLLM_DP_RANK" not in prefill.env
    master = g10.processes[1]
    assert master.argv == ["mooncake_master", "-enable_gc", "true", "-max_threads", "64", "-port", "50001", "--v=1"]
    assert plan.etcd_endpoints == ["10.239.129.9:2379"]
    assert plan.master_address == "10.239.129.9:50001"
    assert plan.proxy_url == "http://10.239.129.9:8868"
    assert (plan.dp_size, plan.ep_size, plan.dp_master) == (16, 16, "g13")

    for index, node in enumerate((g13, g14)):
        decode = [p for p in node.processes if p.role == "decode"]
        assert [p.port for p in decode] == list(range(8200, 8208))
        for local, p in enumerate(decode):
            assert p.env["VLLM_DP_SIZE"] == "16"
            assert p.env["VLLM_EP_SIZE"] == "16"
            assert p.env["VLLM_DP_RANK_LOCAL"] == str(local)
            assert p.env["VLLM_DP_RANK"] == str(index * 8 + local)
            assert p.env["VLLM_DP_MASTER_IP"] == "10.239.129.81"
            assert p.env["VLLM_DP_MASTER_PORT"] == "25940"
            assert p.env["VLLM_USE_ASYNC_TRANSFER_IN_PD"] == "1"
            assert p.argv[p.argv.index("-tp") + 1] == "1"

    proxy = g10.processes[3].argv
    assert proxy[:2] == ["python3", "disagg_proxy_demo.py"]
    decode_list = proxy[proxy.index("--decode") + 1: proxy.index("--port")]
    assert decode_list[:4] == ["10.239.129.81:8200", "10.239.129.165:8200", "10.239.129.81:8201", "10.239.129.165:8201"]
    assert len(decode_list) == 16
    assert proxy[proxy.index("--prefill") + 1] == "10.239.129.9:8100"
    assert "--generator_on_p_node" not in proxy and "--benchmark_mode" not in proxy

    assert g13.mooncake_config == {
        "local_hostname": "10.239.129.81", "metadata_server": "P2PHANDSHAKE", "protocol": "tcp",
        "device_name": "", "master_server_address": "10.239.129.9:50001",
        "global_segment_size": 53687091200, "local_buffer_size": 10737418240,
    }
    written = {f.path: json.loads(f.content) for p in g13.processes for f in p.files}
    assert written == {"/var/lib/pd/g13/mooncake/deepseek-r1.json": g13.mooncake_config}
    assert all(p.env["MOONCAKE_CONFIG_PATH"] == "/var/lib/pd/g13/mooncake/deepseek-r1.json"
               for p in g13.processes)


def test_rdma_protocol_follows_the_nodes_devices_and_the_allow_list():
    def dev(name: str, state: str) -> RdmaDevice:
        return RdmaDevice(name=name, ports=[RdmaPort(port=1, state=state)])

    nodes = seed_nodes()
    nodes["g13"] = facts("g13", SEED_IPS["g13"], rdma_devices=[dev("mlx5_0", "DOWN"), dev("mlx5_3", "ACTIVE")])
    nodes["g14"] = facts("g14", SEED_IPS["g14"], rdma_devices=[dev("mlx5_1", "ACTIVE")])  # not allowed
    plan = plan_cluster(load_spec(EXAMPLE.read_text()), nodes)
    assert (plan.nodes["g13"].mooncake_config["protocol"], plan.nodes["g13"].mooncake_config["device_name"]) == ("rdma", "mlx5_3")
    assert plan.nodes["g14"].mooncake_config["protocol"] == "tcp"


def test_benchmark_mode_is_a_per_run_value():
    doc = example_doc()
    doc["benchmark"] = {"enabled": True, "decode_batch_size": 1024}
    doc["proxy"]["first_token_from"] = "prefill"
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    master = plan.nodes["g10"].processes[1]
    assert "-enable_gc" not in master.argv
    assert all(p.env["VLLM_USE_ASYNC_TRANSFER_IN_PD"] == "0" for _, p in plan.engines())
    proxy = plan.nodes["g10"].processes[-1].argv
    assert proxy[-6:] == ["--generator_on_p_node", "--benchmark_mode", "--repeat_p_request", "1", "--repeat_d_times", "1023"]
    # the same spec without benchmark mode is untouched: nothing leaked into it
    plain = plan_cluster(load_spec(EXAMPLE.read_text()), seed_nodes())
    assert all(p.env["VLLM_USE_ASYNC_TRANSFER_IN_PD"] == "1" for _, p in plain.engines())


def test_tp8_decode_still_gets_distinct_dp_ranks():
    """The scripts never set VLLM_DP_RANK with TP=8: two nodes both claimed rank 0."""
    doc = example_doc()
    doc["decode"].update(tp=8, ep_size=16)
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    ranks = [(p.env["VLLM_DP_RANK"], p.env["VLLM_DP_SIZE"]) for _, p in plan.engines() if p.role == "decode"]
    assert ranks == [("0", "2"), ("1", "2")]


def test_builtin_proxy_follows_etcd():
    doc = example_doc()
    doc["proxy"] = {"kind": "builtin", "extra_args": ["--api-key-file", "/etc/pd/keys"]}
    plan = plan_cluster(validate_spec(doc), seed_nodes(python="/opt/venv/bin/python"))
    argv = plan.nodes["g10"].processes[-1].argv
    assert argv[:3] == ["/opt/venv/bin/python", "-m", "pdsupervisor.proxy"]
    assert argv[argv.index("--etcd") + 1] == "10.239.129.9:2379"
    assert argv[argv.index("--cluster") + 1] == "deepseek-r1"
    assert argv[-2:] == ["--api-key-file", "/etc/pd/keys"]


def test_proxy_workers_are_rendered_only_past_one():
    """`proxy.workers: 1` (the default) leaves the argv, so the spec hash, as it was."""
    doc = example_doc()
    plans = {}
    for workers in (None, 1, 3):
        doc["proxy"] = {"kind": "builtin", **({"workers": workers} if workers else {})}
        plans[workers] = next(p for p in plan_cluster(validate_spec(doc), seed_nodes()).nodes["g10"].processes
                              if p.role == "proxy")
    assert plans[None].argv == plans[1].argv and "--workers" not in plans[1].argv
    assert plans[None].spec_hash() == plans[1].spec_hash() != plans[3].spec_hash()
    assert plans[3].argv[plans[3].argv.index("--workers") + 1] == "3"
    with pytest.raises(ValueError, match="workers"):
        validate_spec({**doc, "proxy": {"kind": "builtin", "workers": 0}})


def test_builtin_proxy_keeps_an_explicit_etcd_scheme():
    """A scheme written in `etcd.endpoints` reaches the proxy's `--etcd` as written: a loopback
    `http://` stays plaintext on a node with etcd TLS; only a bare host:port becomes https there."""
    doc = example_doc()
    doc["proxy"] = {"kind": "builtin"}
    doc["etcd"] = {"endpoints": ["http://127.0.0.1:2379", "10.0.0.9:2379", "https://10.0.0.8:2379"]}
    tls = EtcdAccess(tls=TlsFiles(ca_file="/pki/ca.crt", cert_file="/pki/client.crt", key_file="/pki/client.key"))
    plan = plan_cluster(validate_spec(doc), seed_nodes(etcd_access=tls))
    assert plan.etcd_endpoints == ["http://127.0.0.1:2379", "10.0.0.9:2379", "https://10.0.0.8:2379"]
    argv = plan.nodes["g10"].processes[-1].argv
    etcd = argv[argv.index("--etcd") + 1]
    assert etcd == "http://127.0.0.1:2379,10.0.0.9:2379,https://10.0.0.8:2379" and "--etcd-ca" in argv
    # what the proxy makes of them (its --etcd-ca given): the store's reading
    assert [endpoint_url(e, tls=True) for e in etcd.split(",")] == [
        "http://127.0.0.1:2379", "https://10.0.0.9:2379", "https://10.0.0.8:2379"]


def test_external_proxy_runs_in_its_directory():
    doc = example_doc()
    doc["proxy"]["cwd"] = "/opt/vllm-fork/pd_xpyd"
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    assert plan.nodes["g10"].processes[-1].cwd == "/opt/vllm-fork/pd_xpyd"


def test_same_input_same_plan():
    spec = load_spec(EXAMPLE.read_text())
    a = plan_cluster(spec, seed_nodes()).model_dump_json()
    b = plan_cluster(spec, dict(reversed(list(seed_nodes().items())))).model_dump_json()
    assert a == b


def test_generation_and_restart_epoch_are_planned_in():
    spec = load_spec(EXAMPLE.read_text())
    plain = plan_cluster(spec, seed_nodes())
    plan = plan_cluster(spec, seed_nodes(), generation=4, restart_epoch=2)
    procs = [p for np_ in plan.nodes.values() for p in np_.processes]
    assert plan.generation == 4 and {p.generation for p in procs} == {4}
    assert {p.restart_epoch for p in procs if p.role in ("prefill", "decode")} == {2}
    # only the engines restart on a new epoch; a generation alone restarts nothing
    same = {p.name: p.spec_hash() for np_ in plain.nodes.values() for p in np_.processes if p.role not in ("prefill", "decode")}
    assert {p.name: p.spec_hash() for p in procs if p.role not in ("prefill", "decode")} == same
    assert {p.restart_epoch for p in procs if p.role not in ("prefill", "decode")} == {0}


def test_replace_keeps_dp_ranks_on_the_spare():
    doc = example_doc()
    doc["policy"] = {"node_loss": "replace", "spare_nodes": ["g15"]}
    spec = validate_spec(doc)
    nodes = seed_nodes()
    nodes["g15"] = facts("g15", "10.239.129.200")
    first = plan_cluster(spec, nodes)
    assert first.placement["decode"] == ["g13", "g14"] and first.placement["spare"] == ["g15"]
    del nodes["g14"]
    second = plan_cluster(spec, nodes, previous=first.placement)
    assert second.placement["decode"] == ["g13", "g15"]
    old = [p.env for p in first.nodes["g14"].processes]
    new = [p.env for p in second.nodes["g15"].processes]
    assert [e["VLLM_DP_RANK"] for e in new] == [e["VLLM_DP_RANK"] for e in old] == [str(r) for r in range(8, 16)]
    # the seed's proxy takes its engines on the command line: new argv, so its agent restarts it
    old_proxy, new_proxy = (p.nodes["g10"].processes[-1] for p in (first, second))
    assert "10.239.129.165:8200" in old_proxy.argv and "10.239.129.200:8200" in new_proxy.argv
    assert old_proxy.spec_hash() != new_proxy.spec_hash()
    del nodes["g15"]
    with pytest.raises(PlanError, match="g14 lost and no spare"):
        plan_cluster(spec, nodes, previous=second.placement | {"decode": ["g13", "g14"]})


def test_wait_policy_names_the_missing_node():
    nodes = seed_nodes()
    del nodes["g14"]
    with pytest.raises(PlanError) as err:
        plan_cluster(load_spec(EXAMPLE.read_text()), nodes)
    assert err.value.problems == [("decode.node_names", "node g14 is not registered")]


def test_count_based_roles_pick_by_labels_and_name():
    doc = example_doc()
    doc["prefill"] = {"nodes": 1, "labels": {"pool": "p"}}
    doc["decode"] = {"nodes": 2, "ep_size": 16}
    nodes = {
        "a": facts("a", "127.0.0.2", labels={"pool": "d"}),
        "b": facts("b", "127.0.0.3", labels={"pool": "p"}),
        "c": facts("c", "127.0.0.4"),
        "g10": facts("g10", "127.0.0.5"),
    }
    doc["etcd"] = {"bootstrap_node": "g10"}
    plan = plan_cluster(validate_spec(doc), nodes)
    assert plan.placement == {"prefill": ["b"], "decode": ["a", "c"], "spare": ["g10"]}
    with pytest.raises(PlanError, match=r"prefill.nodes.*labels \{'pool': 'p'\}"):
        plan_cluster(validate_spec(doc), {k: v for k, v in nodes.items() if k != "b"})


# ---- properties over many layouts ----------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    prefill_nodes=st.integers(1, 6),
    decode_nodes=st.integers(1, 4),
    prefill_tp=st.sampled_from([1, 2, 4, 8]),
    decode_tp=st.sampled_from([1, 2, 4, 8]),
)
def test_plan_properties(prefill_nodes: int, decode_nodes: int, prefill_tp: int, decode_tp: int):
    names = [f"n{i:02d}" for i in range(prefill_nodes + decode_nodes)]
    nodes = {n: facts(n, f"127.0.1.{i + 1}") for i, n in enumerate(names)}
    doc = {
        "cluster": "prop", "model": "m",
        "etcd": {"bootstrap_node": names[0]},
        "prefill": {"node_names": names[:prefill_nodes], "tp": prefill_tp},
        "decode": {"node_names": names[prefill_nodes:], "tp": decode_tp},
    }
    plan = plan_cluster(validate_spec(doc), nodes)
    per_node = 8 // decode_tp
    dp_size = decode_nodes * per_node
    assert plan.dp_size == dp_size

    # (node, port) pairs are unique
    pairs = [(n, p.port) for n, np_ in plan.nodes.items() for p in np_.processes]
    assert len(pairs) == len(set(pairs))

    decode = [(n, p) for n, p in plan.engines() if p.role == "decode"]
    ranks = sorted(p.dp_rank for _, p in decode)
    assert ranks == list(range(dp_size))
    for node in names[prefill_nodes:]:
        local = sorted(int(p.env["VLLM_DP_RANK_LOCAL"]) for n, p in decode if n == node) if dp_size > 1 else []
        assert local in ([], list(range(per_node)))
    if dp_size > 1:
        assert all(p.env["VLLM_DP_RANK"] == str(p.dp_rank) for _, p in decode)
        rank0_node = next(n for n, p in decode if p.dp_rank == 0)
        assert plan.dp_master == rank0_node
        assert all(p.env["VLLM_DP_MASTER_IP"] == nodes[rank0_node].ip for _, p in decode)
    else:
        assert all("VLLM_DP_RANK" not in p.env for _, p in decode)

    prefill = [p for _, p in plan.engines() if p.role == "prefill"]
    assert len(prefill) == prefill_nodes * (8 // prefill_tp)
    for name, np_ in plan.nodes.items():
        if np_.mooncake_config:
            assert np_.mooncake_config["master_server_address"] == plan.master_address
            assert np_.mooncake_config["metadata_server"] == "P2PHANDSHAKE"
            assert "etcd" not in json.dumps(np_.mooncake_config).lower()
            assert np_.mooncake_config["local_hostname"] == nodes[name].ip
    assert plan.master_address == f"{nodes[names[0]].ip}:50001"


def test_interleaving_handles_unequal_lists():
    from pdsupervisor.core.models import ProcessSpec
    from pdsupervisor.core.planner import NodePlan

    def np_(ip: str, n: int) -> NodePlan:
        return NodePlan(node=ip, ip=ip, processes=[
            ProcessSpec(name=f"decode-{i}", role="decode", argv=["x"], host=ip, port=8200 + i) for i in range(n)])

    assert interleaved_decode_endpoints([np_("a", 2), np_("b", 1)]) == ["a:8200", "b:8200", "a:8201"]


def test_port_clash_names_both_fields():
    doc = example_doc()
    doc["proxy"]["port"] = 8100
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(doc), seed_nodes())
    assert ("proxy.port", "port 8100 on node g10 is also prefill.base_port") in err.value.problems

    doc = example_doc()
    doc["decode"]["dp_master_port"] = 8203
    with pytest.raises(PlanError, match="decode.dp_master_port.*g13"):
        plan_cluster(validate_spec(doc), seed_nodes())


def test_every_placeholder_the_spec_accepts_is_filled():
    """spec.py's placeholder lists and what the planner fills are kept in step by this test:
    a name accepted but not filled would reach an engine or the proxy as a literal `{name}`."""
    from pdsupervisor.core.spec import ENGINE_PLACEHOLDERS, PROXY_LIST_PLACEHOLDERS, PROXY_PLACEHOLDERS

    doc = example_doc()
    for role in ("prefill", "decode"):
        doc[role]["argv"] = [f"--{n}={{{n}}}" for n in sorted(ENGINE_PLACEHOLDERS)]
    doc["proxy"] = {**doc.get("proxy", {}), "kind": "external",
                    "argv": [f"--{n}={{{n}}}" for n in sorted(PROXY_PLACEHOLDERS)]
                    + [f"{{{n}}}" for n in sorted(PROXY_LIST_PLACEHOLDERS)]}
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    argvs = [p.argv for np_ in plan.nodes.values() for p in np_.processes if p.role in ("prefill", "decode", "proxy")]
    assert len(argvs) == 1 + 16 + 1
    left = sorted({item for argv in argvs for item in argv if "{" in item})
    assert left == [], left


# ---- Mooncake's metadata: never the control-plane etcd -----------------------------------

def _mooncake_jsons(plan) -> list[str]:
    """Every Mooncake JSON the plan would write, as written."""
    return [f.content for _, p in plan.engines() for f in p.files if "/mooncake/" in f.path]


@pytest.mark.parametrize("metadata", [None, "p2p", "master-http", "http://10.239.129.50:8080/metadata"])
def test_no_mooncake_json_names_etcd(metadata):
    doc = example_doc()
    if metadata is not None:
        doc["mooncake"]["metadata"] = metadata
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    written = _mooncake_jsons(plan)
    assert len(written) == 1 + 16
    assert all("etcd" not in text.lower() for text in written), written[0]
    assert all(plan.etcd_endpoints[0] not in text for text in written)


def test_master_http_metadata_is_served_by_the_master_on_its_node_ip():
    doc = example_doc()
    doc["mooncake"].update(metadata="master-http", metadata_port=50080)
    spec = validate_spec(doc)
    plan = plan_cluster(spec, seed_nodes())
    master = plan.nodes["g10"].processes[1]
    assert master.argv == ["mooncake_master", "-enable_gc", "true", "-max_threads", "64", "-port", "50001",
                           "-enable_http_metadata_server=true", "-http_metadata_server_host", "10.239.129.9",
                           "-http_metadata_server_port", "50080", "--v=1"]
    assert plan.nodes["g13"].mooncake_config["metadata_server"] == "http://10.239.129.9:50080/metadata"
    claims = {(c.port, c.field) for c in port_claims(spec, plan, "g10")}
    assert {(50001, "mooncake.port"), (50080, "mooncake.metadata_port")} <= claims
    assert 50080 not in {c.port for c in port_claims(spec, plan, "g13")}
    # p2p (the default) runs no metadata server: nothing more in the argv, no port to claim
    p2p = plan_cluster(load_spec(EXAMPLE.read_text()), seed_nodes())
    assert not any("metadata" in a for a in p2p.nodes["g10"].processes[1].argv)
    assert 8080 not in {c.port for c in port_claims(spec, p2p, "g10")}


def test_master_http_metadata_port_clash_is_named():
    doc = example_doc()
    doc["mooncake"].update(metadata="master-http", metadata_port=8868)  # the proxy's
    with pytest.raises(PlanError) as err:
        plan_cluster(validate_spec(doc), seed_nodes())
    assert ("mooncake.metadata_port", "port 8868 on node g10 is also proxy.port") in err.value.problems


def test_explicit_metadata_url_is_passed_through_unless_it_is_the_control_plane_etcd():
    doc = example_doc()
    doc["mooncake"]["metadata"] = "etcd://10.239.129.50:2379"  # a second etcd, Mooncake's own
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    assert plan.nodes["g13"].mooncake_config["metadata_server"] == "etcd://10.239.129.50:2379"
    for url in ("etcd://10.239.129.9:2379", "etcd://10.239.129.50:2379,10.239.129.9:2379"):
        doc["mooncake"]["metadata"] = url
        with pytest.raises(PlanError) as err:
            plan_cluster(validate_spec(doc), seed_nodes())
        assert [p for p, _ in err.value.problems] == ["mooncake.metadata"]
        assert "10.239.129.9:2379 is the control-plane etcd" in err.value.problems[0][1]


# ---- engine profiles: how the engines read their DP settings ---------------------------------

DP_FLAGS = ["--data-parallel-size", "--data-parallel-rank", "--data-parallel-address", "--data-parallel-rpc-port"]


def _decode(doc: dict) -> list:
    return [p for _, p in plan_cluster(validate_spec(doc), seed_nodes()).engines() if p.role == "decode"]


def test_the_gaudi_profile_sets_the_dp_env_as_the_scripts_do():
    decode = _decode(example_doc())
    assert example_doc().get("engine", "vllm-gaudi") == "vllm-gaudi"
    assert [p.env["VLLM_DP_RANK"] for p in decode] == [str(i) for i in range(16)]
    assert all(flag not in p.argv for p in decode for flag in DP_FLAGS)


def test_the_vllm_profile_passes_the_dp_group_as_flags_and_no_env():
    doc = {**example_doc(), "engine": "vllm"}
    decode = _decode(doc)
    assert all(not k.startswith("VLLM_DP_") and k != "VLLM_EP_SIZE" for p in decode for k in p.env)
    rank5 = next(p for p in decode if p.dp_rank == 5)
    tail = rank5.argv[-8:]
    assert tail == ["--data-parallel-size", "16", "--data-parallel-rank", "5", "--data-parallel-address",
                    SEED_IPS["g13"], "--data-parallel-rpc-port", "25940"]


def test_dp_flags_templated_in_argv_are_not_added_twice():
    doc = {**example_doc(), "engine": "vllm"}
    doc["decode"]["argv"] = ["vllm", "serve", "{model}", "--data-parallel-size", "{dp_size}",
                             "--data-parallel-rank", "{dp_rank}", "--data-parallel-size-local", "8",
                             "--data-parallel-address", "{dp_master_ip}", "--data-parallel-rpc-port", "{dp_master_port}"]
    argv = next(p for p in _decode(doc) if p.dp_rank == 9).argv
    assert argv.count("--data-parallel-size") == 1
    assert argv[argv.index("--data-parallel-rank") + 1] == "9"
    assert argv[argv.index("--data-parallel-address") + 1] == SEED_IPS["g13"]


def test_the_custom_profile_runs_argv_and_env_as_given():
    doc = {**example_doc(), "engine": "custom"}
    doc["decode"]["env"] = {"MY_RANK": "{dp_rank}/{dp_size}@{dp_master_ip}:{dp_master_port}"}
    decode = _decode(doc)
    assert all(flag not in p.argv for p in decode for flag in DP_FLAGS)
    assert all("VLLM_DP_RANK" not in p.env for p in decode)
    assert next(p for p in decode if p.dp_rank == 3).env["MY_RANK"] == f"3/16@{SEED_IPS['g13']}:25940"


@pytest.mark.parametrize("engine", ["vllm", "vllm-gaudi", "custom"])
def test_independent_decode_engines_get_no_dp_settings_at_all(engine):
    doc = {**example_doc(), "engine": engine}
    doc["decode"]["dp_mode"] = "independent"
    doc["decode"]["env"] = {"SEEN": "{dp_rank} {dp_size} {dp_rank_local}"}
    plan = plan_cluster(validate_spec(doc), seed_nodes())
    decode = [p for _, p in plan.engines() if p.role == "decode"]
    assert plan.dp_size == 1 and plan.dp_master is None and len(decode) == 16
    assert all(p.dp_rank is None and p.env["SEEN"] == "0 1 0" for p in decode)
    assert all(flag not in p.argv for p in decode for flag in DP_FLAGS)
    assert all(not k.startswith("VLLM_DP_") for p in decode for k in p.env)
    assert all(c.holder != "decode DP master" for n in plan.nodes for c in port_claims(validate_spec(doc), plan, n))


def test_a_model_change_does_not_restart_the_builtin_proxy():
    doc = example_doc()
    doc["proxy"] = {"kind": "builtin"}
    before = plan_cluster(validate_spec(doc), seed_nodes())
    after = plan_cluster(validate_spec({**doc, "model": "/models/other"}), seed_nodes())
    proxy = [next(p for np_ in plan.nodes.values() for p in np_.processes if p.role == "proxy") for plan in (before, after)]
    assert proxy[0].spec_hash() == proxy[1].spec_hash()
    assert "--model" not in proxy[0].argv


def test_a_node_lost_within_the_grace_is_held_under_replace_only():
    doc = example_doc()
    doc["policy"] = {**doc.get("policy", {}), "node_loss": "replace", "spare_nodes": ["g15"]}
    nodes = {**seed_nodes(), "g15": facts("g15", "10.239.129.200")}
    previous = plan_cluster(validate_spec(doc), nodes).placement
    lost = {n: f for n, f in nodes.items() if n != "g14"}
    with pytest.raises(PlanError) as held:
        plan_cluster(validate_spec(doc), lost, previous=previous, recently_lost=["g14"])
    assert any("replaced after policy.node_loss_grace_s" in why for _, why in held.value.problems)
    assert plan_cluster(validate_spec(doc), lost, previous=previous).placement["decode"][-1] == "g15"
    doc["policy"]["node_loss"] = "wait"
    with pytest.raises(PlanError) as waiting:
        plan_cluster(validate_spec(doc), lost, previous=previous, recently_lost=["g14"])
    assert waiting.value.problems == [("decode.node_names", "node g14 is not registered")]
