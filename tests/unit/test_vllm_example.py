"""etc/pdsupervisor/vllm.example.yaml, the upstream-vLLM example, is a spec the core accepts.

It uses the `engine: vllm` profile (DP through --data-parallel-* flags and the {dp_master_ip}
{dp_master_port} placeholders), and plans into one DP group of 16 with each flag once.
"""

import re
from pathlib import Path

from pdsupervisor.core.models import NodeFacts
from pdsupervisor.core.planner import plan_cluster
from pdsupervisor.core.spec import load_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "pdsupervisor" / "vllm.example.yaml"


def test_vllm_example_is_a_valid_spec() -> None:
    spec = load_spec(EXAMPLE.read_text())
    assert spec.decode.ep_size == 16
    argv = " ".join(spec.decode.argv)
    for flag in ("--data-parallel-size {dp_size}", "--data-parallel-rank {dp_rank}",
                 "--data-parallel-address {dp_master_ip}", "--data-parallel-rpc-port {dp_master_port}"):
        assert flag in argv


def test_vllm_example_plans_one_dp_group_of_16_with_each_flag_once() -> None:
    spec = load_spec(EXAMPLE.read_text())
    names = [*spec.prefill.node_names, *spec.decode.node_names]
    nodes = {n: NodeFacts(name=n, ip=f"10.0.0.{i + 1}") for i, n in enumerate(names)}
    plan = plan_cluster(spec, nodes)
    decode = [p for _, p in plan.engines() if p.role == "decode"]
    master_ip = nodes[spec.decode.node_names[0]].ip
    assert plan.dp_size == len(decode) == 16 and sorted(p.dp_rank for p in decode) == list(range(16))
    for p in decode:
        assert p.argv.count("--data-parallel-size") == 1, p.argv
        assert not [a for a in p.argv if re.search(r"\{[a-z_]+\}", a)], p.argv  # every placeholder filled
        assert p.argv[p.argv.index("--data-parallel-rank") + 1] == str(p.dp_rank)
        assert p.argv[p.argv.index("--data-parallel-address") + 1] == master_ip
        assert not any(k.startswith("VLLM_DP_") for k in p.env)
