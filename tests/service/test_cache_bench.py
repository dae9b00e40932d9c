"""`bench cache` end to end at a small shape: the service path (a real cache process, payload
frames in the local Redis) and the raw path move every sample, the accounting is exact, and no
key of either side is left behind."""

from __future__ import annotations

import argparse
import json

import pytest
import redis
from asyncopd.lab.bench import cache as bench

pytestmark = pytest.mark.service


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    return parser.parse_args(list(argv))


def test_small_shapes_move_every_sample_and_leave_no_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The driver holds torch, as the rollout, teacher and learner processes it stands in for do.
    held: list[bool] = []
    monkeypatch.setattr(bench, "hold_torch_as_producers_do", lambda: held.append(True))
    url = "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(url)
    args = bench_args("--shapes", "8x64x4,4x128x8", "--rounds", "2", "--chunk", "3", "--redis-url", url, "--json")
    assert bench.run(args) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["shape"] for r in results] == ["8x64xtop-4", "4x128xtop-8"]
    for r, samples in zip(results, (8, 4), strict=True):
        assert r["accounting_ok"], r
        # a warm-up round and two timed ones, each the shape's whole batch
        assert r["produced"] == r["trained"] == 3 * samples, r
        assert r["service_s"] > 0 and r["raw_s"] > 0 and r["ratio"] == pytest.approx(r["raw_s"] / r["service_s"])
        assert r["cache_cpu_ms_per_sample"] > 0
        assert r["key_prefix"].startswith("bench-cache-")
        assert list(client.scan_iter(match=r["key_prefix"] + "*")) == []  # the raw side's "-raw" keys too
    assert held == [True, True]  # once per shape
    client.close()
