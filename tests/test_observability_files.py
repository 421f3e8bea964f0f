"""The Grafana dashboard and the Prometheus alert rules in docs/deploy/ load, and name only real metrics.

"Real" means exported by the code: the names come from the control plane's and the agent's own
registries, built here as the processes build them, not from a list kept by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from edgectl.agent.metrics import AgentMetrics
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.fleet_metrics import FLEET_METRICS
from edgectl.control_plane.metrics import Metrics
from edgectl.control_plane.store import StateStore

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"
_NAME = re.compile(r"\b((?:edgectl|process|python)_[a-z0-9_]+)\b")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "info": ("_info",)}  # fmt: skip


def _names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of ``registry`` can show, with the type's suffixes."""
    out: set[str] = set()
    for family in registry.collect():
        out.add(family.name)
        out.update(family.name + s for s in _SUFFIXES.get(family.type, ()))
        out.update(sample.name for sample in family.samples)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    store = StateStore(f"sqlite:///{tmp_path_factory.mktemp('obs') / 'state.db'}")
    try:
        names = _names(Metrics(store, Fleet(store)).registry) | _names(AgentMetrics().registry)
    finally:
        store.close()
    return names


def unknown_metrics(exprs: list[str], exported: set[str]) -> set[str]:
    """The metric names the expressions use that no edgectl process exports."""
    return {name for expr in exprs for name in _NAME.findall(expr)} - exported


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yaml").read_text())
    exprs = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["labels"]["severity"] in ("info", "warning", "critical"), rule
            assert rule["annotations"]["summary"], rule
            exprs.append(rule["expr"])
    return exprs


def test_exported_names_include_the_fleet_aggregates_process_metrics_and_build_info(
    exported: set[str],
) -> None:
    assert set(FLEET_METRICS) <= exported
    assert {"edgectl_build_info", "process_resident_memory_bytes", "process_cpu_seconds_total",
            "python_info", "edgectl_agent_request_latency_seconds_bucket"} <= exported  # fmt: skip


def test_dashboard_is_valid_json_and_queries_only_exported_metrics(exported: set[str]) -> None:
    exprs = _dashboard_exprs()
    assert unknown_metrics(exprs, exported) == set()
    used = {n for e in exprs for n in _NAME.findall(e)}
    assert {"edgectl_fleet_devices_by_version", "edgectl_fleet_p99_ms", "edgectl_fleet_burst_share"} <= used


def test_alert_rules_are_valid_yaml_and_query_only_exported_metrics(exported: set[str]) -> None:
    exprs = _alert_exprs()
    assert unknown_metrics(exprs, exported) == set()
    assert len(exprs) >= 5


def test_the_check_catches_a_misspelled_metric(exported: set[str]) -> None:
    """Positive control: a query naming a metric nobody exports is reported."""
    assert unknown_metrics(
        ["sum(edgectl_fleet_devicez)", "rate(edgectl_agent_requests_total[5m])"], exported
    ) == {"edgectl_fleet_devicez"}
