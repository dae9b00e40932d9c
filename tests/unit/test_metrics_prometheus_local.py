"""The local Prometheus config writer: job names per service, targets file, rule files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from asyncopd.config.metrics import MetricsConfig
from asyncopd.lab.prometheus_local import (
    RULES_DIR,
    LocalPrometheus,
    PrometheusError,
    ScrapeTarget,
    start_for_run,
    target_from_url,
    write_config,
)

pytestmark = pytest.mark.unit


def test_job_per_service_from_process_name() -> None:
    assert target_from_url("rollout-3", "http://127.0.0.1:9000/metrics") == ScrapeTarget(
        "asyncopd-rollout", "127.0.0.1:9000"
    )
    assert target_from_url("cache", "http://127.0.0.1:9001/metrics").job == "asyncopd-cache"
    assert target_from_url("redis-exporter", "http://127.0.0.1:9002/metrics").job == "asyncopd-redis-exporter"


@pytest.mark.parametrize("url", ["127.0.0.1:9000", "https://h:1/metrics", "http://h/metrics"])
def test_bad_metrics_url_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="http://host:port/metrics"):
        target_from_url("cache", url)


def test_config_groups_targets_by_job_and_loads_repo_rules(tmp_path: Path) -> None:
    targets = [
        ScrapeTarget("asyncopd-rollout", "127.0.0.1:1"),
        ScrapeTarget("asyncopd-rollout", "127.0.0.1:2"),
        ScrapeTarget("asyncopd-learner", "127.0.0.1:3"),
    ]
    config = yaml.safe_load(write_config(tmp_path, targets, scrape_interval_s=2.5).read_text())
    assert config["global"]["scrape_interval"] == "2500ms"
    assert config["rule_files"] == [str(p) for p in sorted(RULES_DIR.glob("*.yml"))]
    assert len(config["rule_files"]) == 2
    assert config["scrape_configs"][0]["honor_labels"] is True
    groups = json.loads((tmp_path / "targets.json").read_text())
    assert groups == [
        {"targets": ["127.0.0.1:3"], "labels": {"job": "asyncopd-learner"}},
        {"targets": ["127.0.0.1:1", "127.0.0.1:2"], "labels": {"job": "asyncopd-rollout"}},
    ]


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(PrometheusError, match="apt-get install"):
        LocalPrometheus.start({}, tmp_path, binary="/nonexistent/prometheus")


def test_start_for_run_without_binary_returns_none(tmp_path: Path) -> None:
    config = MetricsConfig(prometheus_binary="/nonexistent/prometheus")
    assert start_for_run(config, {"cache": "http://127.0.0.1:1/metrics"}, tmp_path) is None
    assert not (tmp_path / "prometheus").exists()
