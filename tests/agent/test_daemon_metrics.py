"""``/metrics`` of a real ``edge-agent daemon``: Triton's names for what it serves, the process
and GPU gauges, and the daemon's own loop and update families (docs/inference-api.md)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.api.metrics import COUNTERS, GAUGES, SUMMARIES
from agent.events import EventBus
from agent.observability import AGENT_METRICS, UpdateEventMetrics
from agent.samples import DigitsData
from tests.agent.daemon_proc import digits_daemon, running_daemon

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample lines as exposed (names kept as written: no ``_total`` added, unlike the
    prometheus_client parser does for counters)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if line.startswith("#") or match is None:
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        out.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return out


def _families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


@pytest.mark.broker
def test_daemon_metrics_scraped(tmp_path: Path, digits_path: Path, digits: DigitsData) -> None:
    config, port = digits_daemon(
        tmp_path,
        digits_path,
        digits,
        "metrics-test",
        "[loop]\nrate_hz = 50\nwindow_s = 0.5\n[swap]\nwarmup_runs = 1\n"
        '[mqtt]\nhost = "127.0.0.1"\nport = 1883\nspool_max_bytes = 1048576\n'
        f'topic_prefix = "metrics-test-{os.getpid()}"\n',
    )
    base = f"http://127.0.0.1:{port}"
    with running_daemon(config, port, tmp_path / "daemon.log"):
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [2, 1, 8, 8],
                    "data": digits.x_test[:2].astype(np.float32).ravel().tolist(),
                }
            ]
        }
        for _ in range(5):
            r = httpx.post(f"{base}/v2/models/digits/infer", json=body, timeout=10)
            assert r.status_code == 200, r.text
        bad = httpx.post(f"{base}/v2/models/digits/infer", json={"inputs": []}, timeout=10)
        assert bad.status_code == 400
        time.sleep(1.2)  # a loop window closes
        text = httpx.get(f"{base}/metrics", timeout=10).text
    families = _families(text)
    expected = set(COUNTERS) | set(GAUGES) | set(SUMMARIES)
    expected |= set(AGENT_METRICS)
    assert expected <= families, expected - families
    samples = _samples(text)
    digits_label = {"model": "digits", "version": "1.0.0"}

    def value(name: str, **labels: str) -> float:
        found = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
        assert found, (name, labels)
        return sum(found)

    assert value("nv_inference_request_success", **digits_label) == 5
    assert value("nv_inference_request_failure", **digits_label) == 1
    assert value("nv_inference_count", **digits_label) == 10
    assert value("nv_inference_exec_count", **digits_label) == 5
    assert value("nv_inference_compute_infer_duration_us", **digits_label) > 0
    assert value("nv_inference_pending_request_count", **digits_label) == 0
    assert value("nv_inference_request_summary_us_count", **digits_label) == 5
    assert value("nv_inference_request_summary_us", quantile="0.99", **digits_label) > 0
    assert 0 <= value("nv_cpu_utilization") <= 1
    assert value("nv_cpu_memory_total_bytes") >= value("nv_cpu_memory_used_bytes") > 0
    assert value("edge_agent_loop_frames_total", model="digits", result="ok") > 0
    assert value("edge_agent_loop_latency_ms", model="digits", quantile="0.99") > 0
    assert value("edge_agent_loop_throughput_hz", model="digits") > 0
    assert value("edge_agent_spool_max_bytes") == 1048576
    assert value("edge_agent_spool_bytes") >= 0


def test_update_events_count_swaps_rollbacks_and_probations() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    bus = EventBus("dev-1")
    bus.subscribe(UpdateEventMetrics(registry).on_event)
    for step in ("swapped", "probation_started", "committed"):
        bus.emit(step, model="m", version="2")
    for step in ("swapped", "probation_started", "rolled_back"):
        bus.emit(step, model="m", version="3")
    bus.emit("rolled_back", model="m", version="2")  # an operator's rollback: no probation
    samples = _samples(generate_latest(registry).decode())

    def value(name: str, **labels: str) -> float:
        return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())

    assert value("edge_agent_swaps_total", model="m") == 2
    assert value("edge_agent_rollbacks_total", model="m") == 2
    assert value("edge_agent_probations_total", model="m", outcome="committed") == 1
    assert value("edge_agent_probations_total", model="m", outcome="rolled_back") == 1
    assert value("edge_agent_probation_active", model="m") == 0
    assert value("edge_agent_update_events_total", model="m", step="swapped") == 2
