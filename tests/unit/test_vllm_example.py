"""etc/pdsupervisor/vllm.example.yaml, the upstream-vLLM example, is a spec the core accepts.

It uses the `engine: vllm` profile (DP through --data-parallel-* flags and the {dp_master_ip}
{dp_master_port} placeholders): skipped until the core knows it.
"""

from pathlib import Path

import pytest

from pdsupervisor.core.spec import ClusterSpec, load_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "pdsupervisor" / "vllm.example.yaml"


@pytest.mark.skipif("engine" not in ClusterSpec.model_fields, reason="the core has no `engine` profile yet")
def test_vllm_example_is_a_valid_spec() -> None:
    spec = load_spec(EXAMPLE.read_text())
    assert spec.decode.ep_size == 16
    argv = " ".join(spec.decode.argv)
    for flag in ("--data-parallel-size {dp_size}", "--data-parallel-rank {dp_rank}",
                 "--data-parallel-address {dp_master_ip}", "--data-parallel-rpc-port {dp_master_port}"):
        assert flag in argv
