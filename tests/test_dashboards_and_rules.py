"""The shipped Grafana dashboards and Prometheus rules (deploy/grafana, deploy/prometheus) name
only metrics the code exports: the control plane's as a live `edgectl serve` serves them (with
MQTT ingestion on), the agent's as `agent.api.metrics` and `agent.observability` register them
(tests/agent/test_daemon_metrics.py scrapes those from a real daemon). The rules and the scrape
configuration pass `promtool check` where the Debian `prometheus` package is installed (the apt
step in deploy/dev/services.sh installs it); without promtool the YAML structure is checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from agent.api.metrics import COUNTERS, GAUGES, SUMMARIES
from agent.observability import AGENT_METRICS
from tests.control_plane.conftest import free_port
from tests.control_plane.loopback import stop, wait_http

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
RULES = DEPLOY / "prometheus" / "rules" / "edgefleet.yml"
PROMETHEUS_BUILTINS = {"up"}

# PromQL words that are not metric names.
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "label_values", "label_replace", "abs", "clamp_min", "clamp_max", "vector", "scalar",
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
    "or", "unless", "time",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables and label sets removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables, $__rate_interval
    text = re.sub(r"label_values\(([^,)]*)(?:,[^)]*)?\)", r"\1", text)  # Grafana: (metric, label)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[smhdwy]|ms)?\b", "", text)  # numbers, durations
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return names - _PROMQL_WORDS


def agent_exported() -> set[str]:
    names = set(COUNTERS) | set(GAUGES) | set(AGENT_METRICS)
    for summary in SUMMARIES:
        names |= {summary, f"{summary}_sum", f"{summary}_count"}
    return names


@pytest.fixture(scope="module")
def control_plane_exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name a live `edgectl serve` (ingestion on: the local broker) serves."""
    tmp = tmp_path_factory.mktemp("cp-metrics")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET", "EDGECTL"))}
    port = free_port()
    env |= {
        "EDGEFLEET_CP__PORT": str(port),
        "EDGEFLEET_CP__MQTT_HOST": "127.0.0.1",
        "EDGEFLEET_CP__MQTT_CLIENT_ID": f"dashboards-test-{port}",
        "EDGEFLEET_CP__MQTT_TOPIC_PREFIX": f"dashboards-test-{port}",
    }
    log = (tmp / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "control_plane.cli", "serve"],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", process=process)
        httpx.get(url + "/v1/models")  # an HTTP request, so the labelled HTTP series exist
        text = httpx.get(url + "/metrics").text
    finally:
        stop(process)
        log.close()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    names |= {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.MULTILINE)}
    return names


def _dashboard_exprs(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []) or []:  # type: ignore[attr-defined]
                exprs.append(target["expr"])
            walk(panel.get("panels", []) or [])  # type: ignore[arg-type]

    walk(data["panels"])
    for variable in data.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (model, version) (rate(nv_inference_count{model=~"$model"}[$__rate_interval]))'
        " / max(edge_agent_spool_max_bytes) > 1.2 * avg_over_time(x_y[1d] offset 1h)"
    )
    assert metric_names(expr) == {"nv_inference_count", "edge_agent_spool_max_bytes", "x_y"}


@pytest.mark.broker
@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_name_exported_metrics(
    dashboard: Path, control_plane_exported: set[str]
) -> None:
    data = json.loads(dashboard.read_text())
    assert data["uid"].startswith("edgefleet-")
    for panel in data["panels"]:
        assert panel["datasource"]["uid"] == "edgefleet-prometheus", panel["title"]
    exported = agent_exported() | control_plane_exported | PROMETHEUS_BUILTINS
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 5
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (dashboard.name, expr, names - exported)


def test_every_shipped_dashboard_is_present() -> None:
    assert {p.stem for p in DASHBOARDS} == {"agent", "fleet", "rollouts"}
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["uid"] == "edgefleet-prometheus"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])


@pytest.mark.broker
def test_alert_rules_name_exported_metrics(control_plane_exported: set[str]) -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for wanted in (
        "EdgefleetDeviceOffline",
        "EdgefleetRolloutAborted",
        "EdgefleetP99Regression",
        "EdgefleetSpoolFilling",
    ):
        assert wanted in alerts
    exported = agent_exported() | control_plane_exported | PROMETHEUS_BUILTINS
    for name, rule in alerts.items():
        names = metric_names(rule["expr"])
        assert names, name
        assert names <= exported, (name, names - exported)


def test_rules_and_config_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        # Structure only: every group has a name and rules with alert, expr and labels.
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            assert group["name"]
            for rule in group["rules"]:
                assert {"alert", "expr"} <= set(rule)
        pytest.skip("promtool not installed (apt-get install prometheus): structure checked")
    for argv in (
        [promtool, "check", "rules", str(RULES)],
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
