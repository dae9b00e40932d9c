"""A local Prometheus server scraping a local run: config writing, start/stop by handle, queries.

`asyncopd run --prometheus` calls `start_for_run(config.metrics, metrics_urls, out_dir)`; tests
use the class directly::

    prom = LocalPrometheus.start({"cache": "http://127.0.0.1:9101/metrics", ...}, workdir)
    print(prom.url)                      # the web UI / HTTP API
    prom.query("asyncopd:rollout_tokens:rate1m")
    prom.stop()

The written config has the same shape as deploy/prometheus/prometheus.yml: one scrape job whose
targets come from a file (file service discovery), job label `asyncopd-<service>` per target,
and the repo's recording/alert rules when the checkout has them. This module knows the
Prometheus binary, its config and its HTTP API; it knows nothing about what the services do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from asyncopd.config.metrics import MetricsConfig
from asyncopd.observability.metrics import SERVICES

RULES_DIR = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "rules"
INSTALL_HINT = "prometheus is not installed: run `bash deploy/dev/sysdeps.sh` (Debian: apt-get install prometheus)"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered a query with an error."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One process to scrape: its job (`asyncopd-<service>`), host:port and metrics path."""

    job: str
    address: str
    metrics_path: str = "/metrics"


def target_from_url(name: str, url: str) -> ScrapeTarget:
    """A target from a process name ("rollout-1", "cache") and its metrics URL."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
        raise ValueError(f"metrics URL of {name!r} must look like http://host:port/metrics, got {url!r}")
    service = name.split("-", 1)[0]
    job = f"asyncopd-{service}" if service in SERVICES else f"asyncopd-{name}"
    return ScrapeTarget(job=job, address=f"{parsed.hostname}:{parsed.port}", metrics_path=parsed.path or "/metrics")


def find_binary(name: str = "prometheus") -> str | None:
    """Absolute path of a Prometheus tool (`prometheus`, `promtool`) given a name or path; None if absent."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name)


def write_config(
    workdir: Path,
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval_s: float = 5.0,
    rule_files: Sequence[Path] | None = None,
) -> Path:
    """Write prometheus.yml and its targets file into `workdir`; returns the config path."""
    workdir.mkdir(parents=True, exist_ok=True)
    if rule_files is None:
        rule_files = sorted(RULES_DIR.glob("*.yml")) if RULES_DIR.is_dir() else []
    groups: dict[str, list[str]] = {}
    for t in targets:
        if t.metrics_path != "/metrics":
            raise ValueError(f"target {t.address}: only /metrics is scraped, got {t.metrics_path!r}")
        groups.setdefault(t.job, []).append(t.address)
    targets_path = workdir / "targets.json"
    targets_path.write_text(
        json.dumps([{"targets": addrs, "labels": {"job": job}} for job, addrs in sorted(groups.items())], indent=1)
    )
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
            "external_labels": {"deployment": "local"},
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "asyncopd",
                # Services set their own `service`/`replica` labels; keep them as exported.
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_path)], "refresh_interval": interval}],
            }
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalPrometheus:
    """A running `prometheus` child process; stop it with `stop()` (or use it as a context manager)."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, workdir: Path, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.workdir = workdir
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        metrics_urls: Mapping[str, str] | Sequence[ScrapeTarget],
        workdir: Path | str,
        *,
        binary: str = "prometheus",
        port: int = 0,
        host: str = "127.0.0.1",
        scrape_interval_s: float = 5.0,
        rule_files: Sequence[Path] | None = None,
        ready_timeout_s: float = 30.0,
    ) -> LocalPrometheus:
        """Write the config, start Prometheus on host:port (0 = a free port), wait until it is ready.

        `metrics_urls` maps process names ("rollout-0") to their metrics URLs, or is a list of
        targets. Storage lives in workdir/data; the log in workdir/prometheus.log.
        """
        exe = find_binary(binary)
        if exe is None:
            raise PrometheusError(
                f"{binary!r} not found: install it (Debian: apt-get install -y --no-install-recommends "
                "prometheus, or `bash deploy/dev/sysdeps.sh`) or set metrics.prometheus_binary"
            )
        workdir = Path(workdir)
        targets = (
            [target_from_url(n, u) for n, u in metrics_urls.items()]
            if isinstance(metrics_urls, Mapping)
            else list(metrics_urls)
        )
        config_path = write_config(workdir, targets, scrape_interval_s=scrape_interval_s, rule_files=rule_files)
        port = port or _free_port(host)
        log_path = workdir / "prometheus.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config_path}",
                    f"--web.listen-address={host}:{port}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    "--storage.tsdb.retention.time=7d",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        prom = cls(process, f"http://{host}:{port}", workdir, log_path)
        try:
            prom._wait_ready(ready_timeout_s)
        except BaseException:
            prom.stop()
            raise
        return prom

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready at {self.url} after {timeout_s}s: {self.log_tail()}")

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except FileNotFoundError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns the `data` field, raises PrometheusError on an error status."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"{url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (now, or at unix time `at`); returns the result vector
        ([{"metric": {...}, "value": [ts, "v"]}, ...])."""
        data = self.api("query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} returned a {data['resultType']}, not a vector")
        return list(data["result"])

    def targets_health(self) -> dict[str, str]:
        """scrapeUrl -> health ("up", "down", "unknown") of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_for_run(
    config: MetricsConfig, metrics_urls: Mapping[str, str], output_dir: Path | str
) -> LocalPrometheus | None:
    """Prometheus for a local run, in `<output_dir>/prometheus`; None when the binary is not installed.

    The caller prints `prom.url` (or the install hint on None) and calls `stop()` at the end.
    """
    if find_binary(config.prometheus_binary) is None:
        return None
    return LocalPrometheus.start(
        metrics_urls,
        Path(output_dir) / "prometheus",
        binary=config.prometheus_binary,
        port=config.prometheus_port,
        scrape_interval_s=config.scrape_interval_s,
    )
