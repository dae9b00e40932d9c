"""promtool (from the Prometheus Debian package) accepts every config, rule and PromQL query we ship.

Grafana is not installable here, so dashboard queries are checked the way Prometheus would
parse them: each becomes a recording rule in a generated file that `promtool check rules`
reads, with Grafana's interval variables replaced by a concrete duration.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncopd.lab.prometheus_local import ScrapeTarget, find_binary, write_config

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "asyncopd.json"
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    # The dashboard's label filters, as Grafana sends them with "All" selected.
    "$namespace": ".*",
    "$release": ".*",
    "$replica": ".*",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_binary("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed in CI: deploy/dev/sysdeps.sh must install prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus, or bash deploy/dev/sysdeps.sh)")
    return path


def run(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def dashboard_rules(dashboard: dict[str, Any]) -> dict[str, Any]:
    """Every dashboard query as a recording rule (names only need to be valid and unique)."""
    rules = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            leftover = re.findall(r"\$\w+", expr)
            assert not leftover, f"panel {panel['title']!r}: unknown variables {leftover}"
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId'].lower()}", "expr": expr})
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def test_shipped_config_and_rules_are_valid(promtool: str) -> None:
    result = run(promtool, "check", "config", PROM_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", PROM_DIR / "tests" / "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    generated = dashboard_rules(json.loads(DASHBOARD.read_text()))
    assert len(generated["groups"][0]["rules"]) >= 30
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(generated))
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_query_is_caught(promtool: str, tmp_path: Path) -> None:
    broken = {"panels": [{"id": 1, "title": "t", "targets": [{"refId": "A", "expr": "sum(rate(x[$__rate_interval])"}]}]}
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(dashboard_rules(broken)))
    assert run(promtool, "check", "rules", path).returncode != 0


def test_written_local_config_is_valid(promtool: str, tmp_path: Path) -> None:
    targets = [ScrapeTarget("asyncopd-cache", "127.0.0.1:9101"), ScrapeTarget("asyncopd-rollout", "127.0.0.1:9102")]
    config = write_config(tmp_path, targets, scrape_interval_s=0.5)
    result = run(promtool, "check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout
    assert json.loads((tmp_path / "targets.json").read_text()) == [
        {"targets": ["127.0.0.1:9101"], "labels": {"job": "asyncopd-cache"}},
        {"targets": ["127.0.0.1:9102"], "labels": {"job": "asyncopd-rollout"}},
    ]
