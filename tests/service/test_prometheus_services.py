"""Live scrapes of the real services: every series the dashboard and rules read for a service
exists on that service's /metrics, and a real Prometheus answers the key queries from it.

Services are added here as they land; each drives its service through real RPCs first so the
recorded values are the service's own.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from asyncopd.cache.main import start_cache
from asyncopd.config import load_config
from asyncopd.lab.prometheus_local import LocalPrometheus, find_binary
from asyncopd.observability import metrics
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from prometheus_client.parser import text_string_to_metric_families
from required_tools import missing_tool
from test_cache_harness import (
    VOCAB,
    make_config,
    make_rollout,
    make_scores,
    tiny_prompts,
    tokenize,
    unique_prefix,
    wipe,
)

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
NAME_RE = re.compile(r"\basyncopd_[a-z0-9_]+\b")


def queried_series(service: str) -> set[str]:
    """Sample names of `service` that dashboard queries and Prometheus rules name."""
    exprs = [
        t["expr"]
        for p in json.loads((ROOT / "deploy" / "grafana" / "asyncopd.json").read_text())["panels"]
        for t in p.get("targets", [])
    ]
    for path in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"):
        exprs += [r["expr"] for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    return {n for e in exprs for n in NAME_RE.findall(e) if n.startswith(f"asyncopd_{service}_")}


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def histogram_quantile(q: float, buckets: list[tuple[dict[str, str], float]]) -> float:
    """Prometheus's histogram_quantile over one histogram's cumulative `_bucket` samples."""
    cum = sorted((float(labels["le"]), value) for labels, value in buckets)
    total = cum[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in cum:
        if count >= rank:
            if upper <= 0 or upper == float("inf"):
                return upper if upper <= 0 else lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    raise AssertionError(f"no bucket reaches rank {rank}: {cum}")


def test_cache_exposes_every_queried_series_with_its_own_values(tmp_path: Path) -> None:
    prefix = unique_prefix("prom")
    config = make_config(prefix, max_staleness=2)
    cache = start_cache(config, "cache", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB)
    ch = channel(cache.address)
    try:
        client = CacheClient(ch, timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("rollout-0", 4)
        assert len(prompts) == 4
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        claimed = client.claim_rollouts("teacher-0", 4)
        client.put_scores([make_scores(r) for r in claimed])
        client.publish_version(1)
        batch = client.pull_batch(4, 1, wait_ms=2000)
        assert batch is not None and list(batch.staleness) == [1, 1, 1, 1]
        assert client.ack_batch(batch.batch_id) == 4

        assert cache.metrics_server is not None
        samples = scrape(cache.metrics_server.url)
        wanted = queried_series("cache")
        assert len(wanted) >= 10
        missing = sorted(wanted - set(samples))
        assert not missing, f"queried but not exposed by the cache: {missing}"
        for name in wanted:
            for labels, _ in samples[name]:
                assert labels["service"] == "cache" and labels["replica"] == "cache", (name, labels)

        def value(name: str, **labels: str) -> float:
            return sum(v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items()))

        assert value("asyncopd_cache_admitted_prompts_total") == 4
        assert value("asyncopd_cache_produced_samples_total") == 4
        assert value("asyncopd_cache_trained_samples_total") == 4
        assert value("asyncopd_cache_staleness_count") == 4
        assert value("asyncopd_cache_staleness_bucket", le="0.0") == 0
        assert value("asyncopd_cache_staleness_bucket", le="1.0") == 4
        assert value("asyncopd_cache_max_staleness") == 2
        assert value("asyncopd_cache_batch_max_staleness") == 1

        binary = find_binary("prometheus") or missing_tool("prometheus")
        with LocalPrometheus.start(
            {"cache": cache.metrics_server.url}, tmp_path / "prom", binary=binary, scrape_interval_s=0.5
        ) as prom:
            deadline = time.monotonic() + 30
            while not prom.query("asyncopd_cache_staleness_count"):
                assert time.monotonic() < deadline, prom.log_tail()
                time.sleep(0.25)
            p50 = float(
                prom.query("histogram_quantile(0.5, sum by (le) (asyncopd_cache_staleness_bucket))")[0]["value"][1]
            )
            assert p50 == pytest.approx(histogram_quantile(0.5, samples["asyncopd_cache_staleness_bucket"]))
            assert p50 == pytest.approx(0.5)  # four samples at staleness 1: the middle of the (0, 1] bucket
            bound = prom.query("max(asyncopd_cache_max_staleness)")
            assert float(bound[0]["value"][1]) == 2
    finally:
        ch.close()
        cache.stop(grace=0.5)
        wipe(config.redis.url, prefix)


def test_pipeline_services_expose_every_queried_series_and_prometheus_reads_them(tmp_path: Path) -> None:
    """The real rollout, teacher and learner loops (toy models from assets/) and a real cache, in
    one process with one registry each, train a few steps while a real Prometheus scrapes them."""
    from asyncopd.learner.main import build as build_learner
    from asyncopd.rollout.main import build_engine, sampling_from_config, support_for
    from asyncopd.rollout.replica import RolloutLoop, RolloutReplica
    from asyncopd.teacher.main import build_scorer, teacher_topk
    from asyncopd.teacher.replica import TeacherLoop, TeacherReplica

    prefix = unique_prefix("prom-pipe")
    overrides = [
        "redis.url=redis://127.0.0.1:6379/0",
        f"redis.key_prefix={prefix}",
        f"output_dir={tmp_path / 'run'}",
        "cache.server.port=0",
        "learner.server.port=0",
        "learner.steps=3",
        "learner.batch_size=4",
        "learner.eval_every=0",
        f"learner.checkpoint_dir={tmp_path / 'ckpt'}",
        "rollout.batch_size=4",
        "rollout.sampling.max_tokens=8",
    ]
    toy = str(ROOT / "configs" / "toy.yaml")
    config = load_config(toy, overrides)
    cache = start_cache(config, "cache")
    config = load_config(toy, [*overrides, f"endpoints.cache={cache.address}"])
    ch = channel(cache.address)
    stop = threading.Event()
    regs = {
        "rollout": metrics.ServiceRegistry("rollout", "rollout-0"),
        "teacher": metrics.ServiceRegistry("teacher", "teacher-0"),
    }
    rm, tm = metrics.RolloutMetrics(regs["rollout"]), metrics.TeacherMetrics(regs["teacher"])
    servers = {svc: metrics.MetricsServer(reg) for svc, reg in regs.items()}
    learner = build_learner(config, "learner", stop)
    engine = build_engine(config, "rollout-0")
    kind, k = support_for(config.loss)
    rollout_loop = RolloutLoop(
        RolloutReplica(engine, "rollout-0", rm),
        CacheClient(ch),
        sampling=sampling_from_config(config),
        support_kind=kind,
        k=k,
        batch_size=4,
        wait_ms=200,
        metrics=rm,
    )
    teacher_loop = TeacherLoop(
        TeacherReplica(build_scorer(config, "teacher-0"), "teacher-0", tm),
        CacheClient(ch),
        topk=teacher_topk(config),
        tail=config.teacher.tail,
        claim_batch=4,
        wait_ms=200,
        metrics=tm,
    )
    assert cache.metrics_server is not None and learner.metrics_server is not None
    urls = {
        "cache": cache.metrics_server.url,
        "learner": learner.metrics_server.url,
        "rollout-0": servers["rollout"].url,
        "teacher-0": servers["teacher"].url,
    }
    binary = find_binary("prometheus")
    if binary is None and os.environ.get("CI"):
        missing_tool("prometheus")  # fails under CI; elsewhere the part without Prometheus runs, then skips
    prom = LocalPrometheus.start(urls, tmp_path / "prom", binary=binary, scrape_interval_s=1.0) if binary else None
    threads = [
        threading.Thread(target=target, daemon=True)
        for target in (lambda: rollout_loop.run(stop), lambda: teacher_loop.run(stop), learner.loop.run)
    ]
    try:
        # Prometheus applies discovered targets a few seconds after start; let it scrape every
        # process once before the run, so rates over the run have points at both ends.
        deadline = time.monotonic() + 60
        while prom is not None and not (len(h := prom.targets_health()) == 4 and set(h.values()) == {"up"}):
            assert time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.25)
        for t in threads:
            t.start()
        # The learner's loop returns after its 3 steps (and its final checkpoint); its version
        # moves inside the optimizer step, before the step's metrics are recorded, so wait for
        # the loop to end rather than for the version.
        deadline = time.monotonic() + 180
        while threads[2].is_alive():
            assert time.monotonic() < deadline, f"learner at version {learner.loop.trainer.version} after 180 s"
            # producers exit when the cache says the run finished, which the learner tells it last
            assert learner.loop.finished or all(t.is_alive() for t in threads[:2]), "a producer loop died"
            time.sleep(0.2)
        assert learner.loop.trainer.version == 3

        scraped = {svc: scrape(url) for svc, url in urls.items()}
        for name, samples in scraped.items():
            svc = name.split("-")[0]
            missing = sorted(queried_series(svc) - set(samples))
            assert not missing, f"queried but not exposed by {name}: {missing}"
        learner_samples = scraped["learner"]
        assert learner_samples["asyncopd_learner_steps_total"][0][1] == 3
        assert learner_samples["asyncopd_learner_trained_samples_total"][0][1] == 12
        assert scraped["cache"]["asyncopd_cache_staleness_count"][0][1] == 12
        assert scraped["rollout-0"]["asyncopd_rollout_generated_tokens_total"][0][1] > 0
        assert scraped["teacher-0"]["asyncopd_teacher_scored_samples_total"][0][1] >= 12

        if prom is None:
            missing_tool("prometheus")
        assert prom is not None
        deadline = time.monotonic() + 30
        final_state = {  # each target scraped at least once after the run ended
            "max(asyncopd_learner_policy_version)": 3,
            "sum(asyncopd_cache_staleness_count)": 12,
        }
        for expr, want in final_state.items():
            while not ((got := prom.query(expr)) and float(got[0]["value"][1]) == want):
                assert time.monotonic() < deadline, (expr, got, prom.log_tail())
                time.sleep(0.25)
        assert set(prom.targets_health().values()) == {"up"}
        p90 = float(prom.query("histogram_quantile(0.9, sum by (le) (asyncopd_cache_staleness_bucket))")[0]["value"][1])
        # Prometheus's answer from the buckets it scraped equals the quantile of the buckets the
        # cache exposed at the end of the run (the final state was waited for above).
        final = scrape(urls["cache"])["asyncopd_cache_staleness_bucket"]
        assert p90 == pytest.approx(histogram_quantile(0.9, final)), (p90, final)
        # rate() over the run needs the scrape before it (the counter at 0, taken while every target
        # was waited "up") and one after the replica generated. Targets are scraped at offsets, so
        # the rollout replica's next scrape may not have come yet: wait for Prometheus to hold a
        # non-zero value first, or the rate of two pre-run zeros would read 0. The 5m window keeps
        # the pre-run scrape inside it however long a busy box takes over the run.
        deadline = time.monotonic() + 30
        generated = "sum(asyncopd_rollout_generated_tokens_total)"
        while not ((got := prom.query(generated)) and float(got[0]["value"][1]) > 0):
            assert time.monotonic() < deadline, (got, prom.log_tail())
            time.sleep(0.25)
        rate = prom.query("sum(rate(asyncopd_rollout_generated_tokens_total[5m]))")
        assert rate and float(rate[0]["value"][1]) > 0, rate
        # The recording rule needs two scrapes of the learner in its window; on a busy 2-core box
        # scrapes during training can be sparse, so wait for the rule to turn into a number.
        deadline = time.monotonic() + 30
        while not ((idle := prom.query("asyncopd:learner_idle:ratio5m")) and idle[0]["value"][1] != "NaN"):
            assert time.monotonic() < deadline, idle
            time.sleep(0.5)
        assert 0.0 <= float(idle[0]["value"][1]) <= 1.0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if prom is not None:
            prom.stop()
        learner.close()
        for server in servers.values():
            server.stop()
        engine.close()
        ch.close()
        cache.stop(grace=0.5)
        wipe(config.redis.url, prefix)
