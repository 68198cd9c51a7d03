"""deploy/monitoring: the alert rules pass promtool (and their own unit tests), the dashboard is
well-formed Grafana JSON whose queries parse, and both name only metrics the service exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.conftest import REPO_ROOT

MONITORING = REPO_ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
# Grafana's variables, replaced by values PromQL accepts before promtool parses the queries.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str, cwd: Path = MONITORING) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool() -> None:
    assert "SUCCESS: 5 rules found" in run_promtool("check", "rules", "alerts.yml")


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for number, query in enumerate(dashboard_queries()):
        for variable, value in _GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool(
        "check", "rules", "queries.yml", cwd=tmp_path
    )


def test_dashboard_is_well_formed_grafana_json() -> None:
    board = dashboard()
    for key in ("title", "uid", "schemaVersion", "panels", "templating"):
        assert key in board, key
    assert isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["title"]
        assert panel["type"] in {"stat", "timeseries", "table", "bargauge"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        refs = [target["refId"] for target in panel["targets"]]
        assert refs
        assert len(refs) == len(set(refs))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(board["panels"])))
    assert used - {"__rate_interval"} <= variables


def _exported_names(client: TestClient) -> set[str]:
    """Every series name the service can export, from the # TYPE lines of /metrics."""
    names: set[str] = set()
    suffixes = {
        "counter": ("", "_total"),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
        "info": ("_info",),
    }
    text = client.get("/VezaProvisioner/metrics").text
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
    return names


def test_dashboard_and_alerts_name_only_exported_metrics(client: TestClient) -> None:
    exported = _exported_names(client) | {"up"}
    for query in dashboard_queries() + alert_queries():
        for name in re.findall(r"\b((?:vezaprovisioner|process)_[a-z_]+)\b", query):
            assert name in exported, f"{name} (in {query!r}) is not exported"
