"""`asyncopd bench cache --shards N`: one cache shard against N on a local 3-master Redis Cluster.

The bench starts its own Redis Cluster (`asyncopd.lab.launch.redis_cluster`, the same code the
cluster tests use) and runs the put -> claim -> score -> pull -> ack workload of `bench cache`
(direct payloads: producers write frames to Redis, the cache sees metadata) twice on it, side by
side: with 1 shard (one cache process, every key on one master) and with N shards (N cache
processes, each serving all N shards, the shards' hash tags on N different masters). The load
is the same in both: N driver processes, each playing rollout + teacher for 1/N of every round
and then learner for one batch of 1/N; a round is one learner version (batch size samples/N,
max_staleness N - 1, so the admission window is one round). Driver i talks to cache process
i mod (cache processes). Passes alternate (1, N, 1, N, ...) and each configuration keeps its
best round, so a drifting machine load weighs on both.

Printed: samples/s of each configuration and their ratio (N shards / 1 shard), metadata samples
per second per cache process, the cache processes' CPU per sample and the samples one cache
process handles per CPU second (its ceiling when it has a core to itself), and the CPU each
Redis master spent. It knows the cache only through its gRPC client and payload frames.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

_MIB = 1 << 20


@dataclass(frozen=True)
class Layout:
    """One configuration of the comparison: `shards` cache shards served by as many cache
    processes, loaded by `drivers` driver processes (the same number in every configuration)."""

    shards: int
    drivers: int

    @property
    def processes(self) -> int:
        return self.shards

    def driver_process(self, driver: int) -> int:
        """The cache process driver `driver` talks to."""
        return driver % self.processes


def check_layout(shards: int, samples: int, masters: int) -> None:
    """Refuse a comparison the cluster or the round cannot hold (SystemExit with what to do)."""
    if not 2 <= shards <= masters:
        raise SystemExit(f"--shards {shards}: compare 2..{masters} shards (the local cluster has {masters} masters)")
    if samples % shards:
        raise SystemExit(f"--shards {shards}: the shape's samples ({samples}) must split evenly over the shards")


def shard_summary(
    samples: int, best_round_s: dict[int, float], cache_cpu_s: dict[int, float], rounds: int
) -> dict[str, Any]:
    """The figures printed for each configuration and the ratio N / 1, from plain timings:
    `best_round_s[s]` the best round of s shards, `cache_cpu_s[s]` the CPU seconds of all its
    cache processes over `rounds` timed rounds of `samples` samples."""
    out: dict[str, Any] = {}
    for shards, seconds in best_round_s.items():
        rate = samples / seconds
        cpu_ms = 1000.0 * cache_cpu_s[shards] / (samples * rounds)
        out[str(shards)] = {
            "samples_per_s": rate,
            "samples_per_s_per_cache_process": rate / shards,
            "cache_cpu_ms_per_sample": cpu_ms,
            "samples_per_cpu_s_per_cache_process": 1000.0 / cpu_ms if cpu_ms > 0 else float("inf"),
        }
    one, many = min(best_round_s), max(best_round_s)
    out["ratio"] = out[str(many)]["samples_per_s"] / out[str(one)]["samples_per_s"]
    return out


def _config(args: argparse.Namespace, url: str, prefix: str, layout: Layout) -> Any:
    from asyncopd.config import config_from_dict

    return config_from_dict(
        {
            "max_staleness": layout.drivers - 1,  # window (eta + 1) * B = one round
            "learner": {"batch_size": args.samples // layout.drivers},
            "redis": {"url": url, "key_prefix": prefix, "cluster": True},
            "cache": {
                "hold_until_learner": False,  # admission opens without a learner's begin
                "shards": layout.shards,
                "server": {"port": 0, "workers": 16, "max_message_mb": 512},
                "byte_budget_mb": 8192.0,
                "max_request_mb": 500.0,
                "max_items_per_request": max(4096, args.samples),
            },
        }
    )


def _serve(args: argparse.Namespace, url: str, prefix: str, layout: Layout, conn: Connection) -> None:
    """Child process: one cache process of `layout`, until told to stop; answers 'cpu'."""
    from asyncopd.cache.main import start_cache
    from asyncopd.tasks import PromptItem

    prompts = [PromptItem(f"bench/{i}", f"q{i}", "0", "toy") for i in range(args.samples)]
    ids = list(range(1, args.prompt_tokens + 1))
    cache = start_cache(
        _config(args, url, prefix, layout), "cache-shards-bench", prompts=prompts, tokenize=lambda _: ids,
        vocab_size=args.vocab, serve_metrics=False,
    )  # fmt: skip
    conn.send(cache.address)
    while conn.recv() == "cpu":
        conn.send(time.process_time())
    cache.stop(grace=1.0)


def _drive(
    args: argparse.Namespace, conn: Connection, *, driver: int, address: str, url: str, prefix: str, share: int
) -> None:
    """Child process: one driver. On ('produce', v): acquire `share` prompts, write frames, put,
    claim `share` rollouts, read them, write scores, put. On ('learn', v): pull one batch of
    `share` at v, read and verify its frames, ack. Answers each with its seconds."""
    from asyncopd.config.redis import RedisConfig
    from asyncopd.lab.bench.cache import _records, hold_torch_as_producers_do
    from asyncopd.wire.cache_client import CacheClient
    from asyncopd.wire.payload_store import PayloadStore
    from asyncopd.wire.rpc import channel

    hold_torch_as_producers_do()
    one = argparse.Namespace(**{**vars(args), "samples": share})
    rollout, scores = _records(one)
    store = PayloadStore.from_config(RedisConfig(url=url, key_prefix=prefix, cluster=True))
    ch = channel(address, max_message_mb=512)
    client = CacheClient(ch, logprob_dtype="float16", timeout_s=120.0, payloads=store)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        what, version = msg
        start = time.perf_counter()
        if what == "produce":
            prompts, _, _ = client.acquire_prompts(f"bench-driver-{driver}", share)
            assert len(prompts) == share, f"admission gave {len(prompts)} of {share} prompts"
            versions = np.full(args.tokens, version, np.int32)
            rollouts = [
                replace(rollout, sample_id=f"{p.ticket}/s", ticket=p.ticket, prompt_id=p.prompt_id, versions=versions)
                for p in prompts
            ]
            for i in range(0, share, args.chunk):
                client.put_rollouts(rollouts[i : i + args.chunk])
            scored = 0
            while scored < share:
                claimed = client.claim_rollouts("bench-teacher", min(args.chunk, share - scored), wait_ms=1000)
                if not claimed:
                    raise RuntimeError(f"the teacher queue ran dry after {scored} of {share} rollouts")
                client.put_scores([replace(scores, sample_id=r.sample_id) for r in claimed])
                scored += len(claimed)
        else:
            batch = client.pull_batch(share, version, wait_ms=5000)
            assert batch is not None and len(batch.samples) == share, "the learner's batch did not come"
            client.ack_batch(batch.batch_id)
        conn.send(time.perf_counter() - start)
    ch.close()
    store.close()


def _measure(args: argparse.Namespace, cluster: Any, layout: Layout) -> dict[str, Any]:
    """One pass of `layout` on `cluster`: best round, cache CPU and Redis CPU over the timed rounds."""
    import redis

    from asyncopd.lab.launch.redis_cluster import spread_prefix
    from asyncopd.wire.cache_client import CacheClient
    from asyncopd.wire.rpc import channel

    seed = redis.RedisCluster.from_url(cluster.url)
    try:
        prefix = spread_prefix(lambda k: str(seed.get_node_from_key(k).name), "bench-shards", layout.shards)
    finally:
        seed.close()
    ctx = mp.get_context("spawn")
    servers, drivers, procs = [], [], []
    ch = None
    try:
        for _ in range(layout.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(args, cluster.url, prefix, layout, child), daemon=True)
            proc.start()
            servers.append(parent)
            procs.append(proc)
        addresses = [first_answer(conn, "a cache process") for conn in servers]
        share = args.samples // layout.drivers
        for d in range(layout.drivers):
            parent, child = ctx.Pipe()
            address = addresses[layout.driver_process(d)]
            proc = ctx.Process(
                target=_drive,
                args=(args, child),
                kwargs={"driver": d, "address": address, "url": cluster.url, "prefix": prefix, "share": share},
                daemon=True,
            )
            proc.start()
            drivers.append(parent)
            procs.append(proc)
        for conn in drivers:
            assert first_answer(conn, "a driver process") == "ready"
        ch = channel(addresses[0])
        control = CacheClient(ch)
        rounds: list[float] = []
        cpu = 0.0
        redis_cpu = [0.0] * len(cluster.ports)
        for version in range(args.rounds + 1):
            cpu0 = _cache_cpu(servers)
            redis0 = cluster.cpu_seconds()
            start = time.perf_counter()
            for phase in ("produce", "learn"):
                for conn in drivers:
                    conn.send((phase, version))
                for conn in drivers:
                    conn.recv()
            control.publish_version(version + 1)
            elapsed = time.perf_counter() - start
            if version > 0:  # the first round warms up
                rounds.append(elapsed)
                cpu += _cache_cpu(servers) - cpu0
                redis_cpu = [a + b - c for a, b, c in zip(redis_cpu, cluster.cpu_seconds(), redis0, strict=True)]
        stats = control.stats_snapshot()
    finally:
        for conn in drivers + servers:
            conn.send("stop")
        for proc in procs:
            proc.join(timeout=30)
        if ch is not None:
            ch.close()
    total = args.samples * (args.rounds + 1)
    ok = stats.invariant_holds() and stats.trained == total and stats.in_flight == 0
    return {
        "shards": layout.shards,
        "best_round_s": min(rounds),
        "cache_cpu_s": cpu,
        "redis_cpu_s_per_master": redis_cpu,
        "accounting_ok": ok,
        "produced": stats.produced,
        "trained": stats.trained,
    }


def first_answer(conn: Connection, who: str, timeout_s: float = 180.0) -> Any:
    """A child's first message; a child that died starting (its traceback is above) never sends it."""
    if not conn.poll(timeout_s):
        raise RuntimeError(f"{who} did not start within {timeout_s:.0f} s (if it died, its traceback is above)")
    return conn.recv()


def _cache_cpu(servers: list[Connection]) -> float:
    total = 0.0
    for conn in servers:
        conn.send("cpu")
        total += float(conn.recv())
    return total


def run(args: argparse.Namespace) -> int:
    from asyncopd.lab.launch.redis_cluster import LocalCluster

    if len(args.shapes) != 1:
        raise SystemExit("--shards compares one shape: give one --shapes SAMPLESxTOKENSxTOPK")
    shape = args.shapes[0]
    args = argparse.Namespace(**{**vars(args), "samples": shape.samples, "tokens": shape.tokens, "topk": shape.topk})
    masters = 3
    check_layout(args.shards, args.samples, masters)
    layouts = [Layout(1, args.shards), Layout(args.shards, args.shards)]
    passes: dict[int, list[dict[str, Any]]] = {lay.shards: [] for lay in layouts}
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        LocalCluster(Path(tmp), masters=masters, maxmemory=f"{args.cluster_maxmemory_mb}mb") as cluster,
    ):
        for _ in range(args.shard_repeats):
            for layout in layouts:
                passes[layout.shards].append(_measure(args, cluster, layout))
    best = {s: min(ps, key=lambda p: p["best_round_s"]) for s, ps in passes.items()}
    summary = shard_summary(
        args.samples, {s: b["best_round_s"] for s, b in best.items()}, {s: b["cache_cpu_s"] for s, b in best.items()},
        args.rounds,
    )  # fmt: skip
    print(
        f"cache bench, shards on a local {masters}-master Redis Cluster: {shape}, direct payloads, "
        f"{args.shards} driver processes, best of {args.rounds} rounds x {args.shard_repeats} alternating passes"
    )
    print(
        f"  {'shards':>6} {'cache procs':>11} {'samples/s':>10} {'smp/s per cache proc':>21} "
        f"{'cache CPU ms/smp':>17} {'smp per CPU-s per proc':>23} {'Redis CPU s per master':>24}  accounting"
    )
    for s, b in best.items():
        f = summary[str(s)]
        print(
            f"  {s:>6} {s:>11} {f['samples_per_s']:>10.1f} {f['samples_per_s_per_cache_process']:>21.1f} "
            f"{f['cache_cpu_ms_per_sample']:>17.3f} {f['samples_per_cpu_s_per_cache_process']:>23.0f} "
            f"{' '.join(f'{c:.2f}' for c in b['redis_cpu_s_per_master']):>24}  "
            f"{'ok' if b['accounting_ok'] else 'BROKEN'} (produced {b['produced']}, trained {b['trained']})"
        )
    print(f"  ratio {args.shards} shards / 1 shard: {summary['ratio']:.3f}")
    if args.json:
        print(json.dumps({"summary": summary, "passes": passes}))
    return 0 if all(p["accounting_ok"] for ps in passes.values() for p in ps) else 1
