"""Counting an engine's requests in flight from its Prometheus text (`agent.process.drain`)."""

from __future__ import annotations

import pytest

from agent.process.drain import inflight, message
from pdsupervisor.core.models import INFLIGHT_METRICS

TEXT = """# HELP vllm:num_requests_running Requests in a batch slot.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 2.0
vllm:num_requests_running{model_name="b"} 1.0
# HELP vllm:num_requests_waiting Requests waiting for a slot.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 4.0
# HELP vllm:request_success_total Requests finished.
# TYPE vllm:request_success_total counter
vllm:request_success_total{model_name="a"} 99.0
"""


def test_the_gauges_are_summed_over_their_labels():
    assert inflight(TEXT, INFLIGHT_METRICS) == 7
    assert inflight(TEXT, ["vllm:num_requests_running"]) == 3
    assert inflight(TEXT.replace(" 2.0", " 0.0").replace(" 1.0", " 0.0").replace(" 4.0", " 0.0"), INFLIGHT_METRICS) == 0


def test_none_of_the_gauges_is_none_not_zero():
    assert inflight("# nothing here\nother_metric 3\n", INFLIGHT_METRICS) is None
    assert inflight("", INFLIGHT_METRICS) is None


@pytest.mark.parametrize("text", ["vllm:num_requests_running{ 1\n", "vllm:num_requests_running NaN\n"])
def test_text_that_is_not_prometheus_raises(text):
    with pytest.raises(ValueError):
        inflight(text, INFLIGHT_METRICS)


def test_messages():
    assert message(3) == "draining: 3 requests in flight"
    assert message("GET x failed") == "draining: requests in flight unknown (GET x failed)"
