"""The pure parts of `asyncopd bench cache --shards`: the layout it refuses, the ratio and per-process
figures it prints, the drivers' spread over cache processes, and the key prefix that puts each
shard on its own node (given where keys land; the cluster itself is exercised by the service test
tests/service/test_cache_cluster.py)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import zlib
from collections.abc import Callable

import pytest
from asyncopd.lab.bench import cache as cache_bench
from asyncopd.lab.bench.cache_shards import Layout, check_layout, first_answer, shard_summary
from asyncopd.lab.launch.redis_cluster import spread_prefix

pytestmark = pytest.mark.unit


def test_the_cache_bench_parses_shards_and_defaults_to_off() -> None:
    parser = argparse.ArgumentParser()
    cache_bench.add_args(parser)
    assert parser.parse_args([]).shards == 0
    args = parser.parse_args(["--shards", "2", "--shapes", "64x512x8", "--shard-repeats", "3"])
    assert (args.shards, args.shard_repeats, len(args.shapes)) == (2, 3, 1)


@pytest.mark.parametrize(("shards", "samples"), [(1, 64), (4, 64), (2, 63)])
def test_a_layout_the_cluster_or_the_round_cannot_hold_is_refused(shards: int, samples: int) -> None:
    with pytest.raises(SystemExit, match=f"--shards {shards}"):
        check_layout(shards, samples, masters=3)


def test_a_layout_that_fits_is_accepted() -> None:
    check_layout(2, 256, masters=3)
    check_layout(3, 255, masters=3)


def test_drivers_spread_over_the_cache_processes() -> None:
    assert [Layout(1, 2).driver_process(d) for d in range(2)] == [0, 0]
    assert [Layout(2, 2).driver_process(d) for d in range(2)] == [0, 1]
    assert [Layout(3, 3).driver_process(d) for d in range(4)] == [0, 1, 2, 0]


def test_shard_summary_ratio_and_per_process_figures() -> None:
    # 256 samples: 1 shard in 0.5 s (512/s), 2 shards in 0.25 s (1024/s); cache CPU over 2 rounds
    out = shard_summary(256, {1: 0.5, 2: 0.25}, {1: 0.256, 2: 0.512}, rounds=2)
    assert out["ratio"] == pytest.approx(2.0)
    assert out["1"]["samples_per_s"] == pytest.approx(512.0)
    assert out["2"]["samples_per_s_per_cache_process"] == pytest.approx(512.0)
    assert out["1"]["cache_cpu_ms_per_sample"] == pytest.approx(0.5)  # 256 ms over 512 samples
    assert out["2"]["cache_cpu_ms_per_sample"] == pytest.approx(1.0)
    assert out["1"]["samples_per_cpu_s_per_cache_process"] == pytest.approx(2000.0)
    slower = shard_summary(100, {1: 1.0, 3: 2.0}, {1: 0.1, 3: 0.1}, rounds=1)
    assert slower["ratio"] == pytest.approx(0.5)


def _node_of(nodes: int) -> Callable[[str], str]:
    return lambda key: f"n{zlib.crc32(key.encode()) % nodes}"


def test_spread_prefix_puts_each_shard_on_its_own_node() -> None:
    node_of = _node_of(3)
    for shards in (1, 2, 3):
        prefix = spread_prefix(node_of, "bench", shards)
        assert prefix.startswith("bench-")
        tags = [f"{prefix}:{{{prefix}:s{i}}}" for i in range(shards)]  # payload.shard_prefix
        assert len({node_of(t) for t in tags}) == shards


def test_spread_prefix_refuses_more_shards_than_nodes() -> None:
    with pytest.raises(ValueError, match="3 shards on 3 different nodes"):
        spread_prefix(_node_of(2), "bench", 3, tries=50)


def test_a_child_that_never_answers_fails_loudly_instead_of_hanging() -> None:
    parent, child = mp.Pipe()
    with pytest.raises(RuntimeError, match="a cache process did not start within 0 s"):
        first_answer(parent, "a cache process", timeout_s=0.05)
    child.send("tcp://x")
    assert first_answer(parent, "a cache process", timeout_s=1.0) == "tcp://x"
