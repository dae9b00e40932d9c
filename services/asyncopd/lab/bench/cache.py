"""`asyncopd bench cache`: throughput of the cache service against raw Redis on the same bytes.

One round moves N realistic samples (P prompt tokens, T response tokens, teacher top-K) through
the whole service path as deployed: the cache service in its own process; the rollout side
encodes payload frames, writes them to Redis itself and puts their metadata (AcquirePrompts ->
PutRollouts); the teacher claims metadata, reads and verifies the rollout frames, writes its
score frames and puts their metadata (ClaimRollouts -> PutScores); the learner pulls a batch of
references, reads and verifies every frame (PullBatch -> AckBatch). `--inline` sends the
payloads through the cache RPCs instead (the path for clients without Redis access). The driver
imports torch first, as every process it stands in for holds it (the codec's casts go through it).

The baseline moves the same stored bytes (the frames' lengths) through raw Redis in the same
data flow: SET rollout, GET rollout (teacher), SET scores, GET both (learner), DEL, pipelined
per chunk. Printed per shape: service throughput / raw throughput, and the cache process's CPU
time per sample (user + system of all its threads, over the timed rounds) -- flat across
shapes when no payload byte passes through the cache. Default shapes: 256 x 512 x top-64 and
64 x 4,096 x top-64 (issue #16's targets: ratio >= 0.8, <= 0.3 ms CPU per sample).

`--fsync everysec,always` measures the cost of durability (issue #20): the same workload runs
against one redis-server per mode (AOF on, `appendfsync` set to the mode, in a temporary
directory on the repository's disk), the modes alternating over `--fsync-repeats` passes (best
pass kept, so drifting machine load weighs on both), and the service throughput of each mode is
printed relative to the first one. The chart ships `appendfsync always`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from asyncopd.cache.connection import delete_prefix

_MIB = 1 << 20


@dataclass(frozen=True)
class Shape:
    samples: int
    tokens: int
    topk: int

    def __str__(self) -> str:
        return f"{self.samples}x{self.tokens}xtop-{self.topk}"


def _shapes(text: str) -> list[Shape]:
    out = []
    for part in text.split(","):
        n, t, k = (int(x) for x in part.strip().lower().split("x"))
        out.append(Shape(n, t, k))
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        type=_shapes,
        default=_shapes("256x512x64,64x4096x64"),
        help="comma-separated SAMPLESxTOKENSxTOPK: samples per round (= learner batch), response tokens, teacher top-K",
    )
    parser.add_argument("--inline", action="store_true", help="payloads through the cache RPCs (no direct Redis)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per sample")
    parser.add_argument("--chunk", type=int, default=32, help="samples per put/claim request")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--vocab", type=int, default=151669, help="vocabulary size of the synthetic ids")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to use (keys are removed)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    parser.add_argument(
        "--fsync",
        default="",
        help="comma-separated appendfsync modes (e.g. everysec,always): run the workload once per mode on a "
        "private redis-server with AOF on and print each mode's throughput relative to the first "
        "(--redis-url is ignored then)",
    )
    parser.add_argument(
        "--fsync-repeats", type=int, default=3, help="with --fsync: passes per mode, alternating (best kept)"
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=0,
        help="N >= 2: start a local 3-master Redis Cluster and run one shape with 1 shard and with N shards "
        "(N cache processes), N driver processes in both, and print the throughput ratio N / 1 "
        "(--redis-url is ignored then; see asyncopd.lab.bench.cache_shards)",
    )
    parser.add_argument(
        "--shard-repeats", type=int, default=2, help="with --shards: passes per configuration, alternating (best kept)"
    )
    parser.add_argument(
        "--cluster-maxmemory-mb", type=int, default=1024, help="with --shards: maxmemory of each cluster master"
    )


def _config(args: argparse.Namespace, prefix: str) -> Any:
    from asyncopd.config import config_from_dict

    return config_from_dict(
        {
            "max_staleness": 0,
            "learner": {"batch_size": args.samples},
            "redis": {"url": args.redis_url, "key_prefix": prefix},
            "cache": {
                "hold_until_learner": False,  # admission opens without a learner's begin
                "server": {"port": 0, "workers": 16, "max_message_mb": 512},
                "byte_budget_mb": 8192.0,
                "max_request_mb": 500.0,
                "max_items_per_request": max(4096, args.samples),
            },
        }
    )


def _serve(args: argparse.Namespace, prefix: str, conn: Connection) -> None:
    """Child process: the cache service over synthetic prompts, until told to stop."""
    from asyncopd.cache.main import start_cache
    from asyncopd.tasks import PromptItem

    prompts = [PromptItem(f"bench/{i}", f"q{i}", "0", "toy") for i in range(args.samples)]
    ids = list(range(1, args.prompt_tokens + 1))
    cache = start_cache(
        _config(args, prefix), "cache-bench", prompts=prompts, tokenize=lambda _: ids, vocab_size=args.vocab,
        serve_metrics=False,
    )  # fmt: skip
    conn.send(cache.address)
    while conn.recv() == "cpu":  # CPU seconds of this process, all threads (the gRPC workers)
        conn.send(time.process_time())
    cache.stop(grace=1.0)


def _records(args: argparse.Namespace) -> tuple[Any, Any]:
    from asyncopd.records import Rollout, SupportKind, TaskInfo, TeacherScores

    rng = np.random.default_rng(0)
    t, k = args.tokens, args.topk
    rollout = Rollout(
        sample_id="x",
        prompt_id="x",
        ticket="x",
        task=TaskInfo("toy", "0", ""),
        prompt_ids=np.arange(1, args.prompt_tokens + 1, dtype=np.int32),
        response_ids=rng.integers(0, args.vocab, t).astype(np.int32),
        behavior_logprobs=-rng.random(t).astype(np.float32),
        versions=np.zeros(t, np.int32),
        support_kind=SupportKind.NONE,
    )
    scores = TeacherScores(
        sample_id="x",
        token_logprobs=-rng.random(t).astype(np.float32),
        topk_ids=rng.integers(0, args.vocab, (t, k)).astype(np.int32),
        topk_logprobs=-rng.random((t, k)).astype(np.float32) * 5,
        teacher="t0",
    )
    return rollout, scores


def hold_torch_as_producers_do() -> None:
    """Import torch in this driver. The processes it stands in for (a vLLM rollout, a teacher, the
    learner) all hold torch, so their frame codec casts half-precision arrays through it
    (`wire.tensors.cast_into`, the same bits as numpy's cast, ~25x faster); a driver without it
    would measure a codec path no deployed producer or reader takes."""
    import torch  # noqa: F401


def _service_round(client: Any, args: argparse.Namespace, version: int, rollout: Any, scores: Any) -> dict[str, float]:
    times: dict[str, float] = {}
    start = time.perf_counter()
    prompts, _, _ = client.acquire_prompts("bench", args.samples)
    assert len(prompts) == args.samples, f"admission gave {len(prompts)} of {args.samples} prompts"
    versions = np.full(args.tokens, version, np.int32)  # generated by the current weights
    rollouts = [
        replace(rollout, sample_id=f"{p.ticket}/s", ticket=p.ticket, prompt_id=p.prompt_id, versions=versions)
        for p in prompts
    ]
    t0 = time.perf_counter()
    for i in range(0, len(rollouts), args.chunk):
        client.put_rollouts(rollouts[i : i + args.chunk])
    t1 = time.perf_counter()
    scored = 0
    while scored < args.samples:
        claimed = client.claim_rollouts("bench-teacher", args.chunk, wait_ms=1000)
        if not claimed:
            raise RuntimeError(f"the teacher queue ran dry after {scored} of {args.samples} rollouts")
        client.put_scores([replace(scores, sample_id=r.sample_id) for r in claimed])
        scored += len(claimed)
    t2 = time.perf_counter()
    batch = client.pull_batch(args.samples, version, wait_ms=5000)
    assert batch is not None and len(batch.samples) == args.samples
    client.ack_batch(batch.batch_id)
    client.publish_version(version + 1)
    t3 = time.perf_counter()
    times.update(acquire=t0 - start, put=t1 - t0, claim_score=t2 - t1, pull_ack=t3 - t2, total=t3 - start)
    return times


def _raw_round(client: Any, args: argparse.Namespace, prefix: str, blobs: tuple[bytearray, bytearray]) -> float:
    r_blob, s_blob = blobs
    n = args.samples
    start = time.perf_counter()
    for lo in range(0, n, args.chunk):
        hi = min(n, lo + args.chunk)
        pipe = client.pipeline(transaction=False)
        for i in range(lo, hi):
            pipe.set(f"{prefix}:r:{i}", memoryview(r_blob))  # as PayloadStore sends frames: no copy
        pipe.execute()
        pipe = client.pipeline(transaction=False)
        for i in range(lo, hi):
            pipe.get(f"{prefix}:r:{i}")
        pipe.execute()
        pipe = client.pipeline(transaction=False)
        for i in range(lo, hi):
            pipe.set(f"{prefix}:s:{i}", memoryview(s_blob))
        pipe.execute()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.mget(f"{prefix}:r:{i}", f"{prefix}:s:{i}")
    pipe.execute()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.delete(f"{prefix}:r:{i}", f"{prefix}:s:{i}")
    pipe.execute()
    return time.perf_counter() - start


def _cpu_s(conn: Connection) -> float:
    """The cache process's CPU seconds so far (it answers between requests)."""
    conn.send("cpu")
    return float(conn.recv())


def _run_shape(args: argparse.Namespace) -> dict[str, Any]:
    """One shape: `args.samples`, `args.tokens`, `args.topk` set; a fresh cache process."""
    import redis

    from asyncopd.wire import payload
    from asyncopd.wire.cache_client import CacheClient
    from asyncopd.wire.payload_store import READ_SIZE, PayloadStore
    from asyncopd.wire.rpc import channel

    hold_torch_as_producers_do()
    prefix = f"bench-cache-{uuid.uuid4().hex[:8]}"
    rollout, scores = _records(args)
    stored = (payload.encode_rollout(rollout, "float16").data, payload.encode_scores(scores, "float16").data)
    sample_mb = (len(stored[0]) + len(stored[1])) / _MIB
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args, prefix, child), daemon=True)
    server.start()
    # The raw side reads like a payload client (READ_SIZE) and writes views, as PayloadStore does.
    raw_client = redis.Redis.from_url(args.redis_url, socket_read_size=READ_SIZE)
    store = (
        None if args.inline else PayloadStore(redis.Redis.from_url(args.redis_url, socket_read_size=READ_SIZE), prefix)
    )
    try:
        address = parent.recv()
        ch = channel(address, max_message_mb=512)
        client = CacheClient(ch, logprob_dtype="float16", timeout_s=120.0, payloads=store)
        service: list[dict[str, float]] = []
        cpu = 0.0
        for round_ in range(args.rounds + 1):
            cpu_before = _cpu_s(parent)
            times = _service_round(client, args, round_, rollout, scores)
            if round_ > 0:
                service.append(times)
                cpu += _cpu_s(parent) - cpu_before
        raw = [_raw_round(raw_client, args, prefix + "-raw", stored) for _ in range(args.rounds + 1)][1:]
        stats = client.stats_snapshot()
        ch.close()
    finally:
        parent.send("stop")
        server.join(timeout=30)
        for own in (prefix, prefix + "-raw"):
            delete_prefix(raw_client, own)
        raw_client.close()
        if store is not None:
            store.close()
    best_service, best_raw = min(t["total"] for t in service), min(raw)
    svc_rate, raw_rate = args.samples / best_service, args.samples / best_raw
    ok = stats.invariant_holds() and stats.trained == args.samples * (args.rounds + 1) and stats.in_flight == 0
    return {
        "shape": f"{args.samples}x{args.tokens}xtop-{args.topk}",
        "samples": args.samples,
        "tokens": args.tokens,
        "topk": args.topk,
        "path": "inline" if args.inline else "direct",
        "sample_mib": sample_mb,
        "service_s": best_service,
        "raw_s": best_raw,
        "service_samples_per_s": svc_rate,
        "raw_samples_per_s": raw_rate,
        "ratio": svc_rate / raw_rate,
        "cache_cpu_ms_per_sample": 1000.0 * cpu / (args.samples * args.rounds),
        "phases_s": {k: min(t[k] for t in service) for k in ("acquire", "put", "claim_score", "pull_ack")},
        "accounting_ok": ok,
        "key_prefix": prefix,  # its keys and the raw side's (prefix + "-raw") are removed at the end
        "produced": stats.produced,
        "trained": stats.trained,
    }


@contextmanager
def _aof_redis(mode: str) -> Iterator[str]:
    """A redis-server with AOF on and `appendfsync mode`, on a free port in a temp dir (by handle)."""
    import redis

    from asyncopd.lab.launch.redis_server import find_redis_server

    exe = find_redis_server()
    if exe is None:
        raise SystemExit("--fsync needs redis-server on PATH")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="bench-aof-", dir=".") as tmp:
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", mode, "--maxmemory-policy", "noeviction"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _run_fsync(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.fsync.split(",") if m.strip()]
    if not modes or any(m not in ("always", "everysec", "no") for m in modes):
        raise SystemExit(f"--fsync {args.fsync!r}: name modes among always, everysec, no")
    # Modes alternate (A B A B ...) for --fsync-repeats passes, each mode's best pass kept per
    # shape: a machine whose load drifts then weighs on both modes alike.
    passes: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(_aof_redis(m)) for m in modes}
        for _ in range(args.fsync_repeats):
            for mode in modes:
                passes[mode].append(_run_shapes(argparse.Namespace(**{**vars(args), "redis_url": urls[mode]})))
    by_mode = {
        m: [max((p[i] for p in passes[m]), key=lambda r: r["service_samples_per_s"]) for i in range(len(args.shapes))]
        for m in modes
    }
    base = modes[0]
    print(
        f"cache bench, durability: AOF on, appendfsync per mode, modes alternating over {args.fsync_repeats} "
        f"passes (best kept); service throughput relative to {base}"
    )
    print(f"  {'shape':<20} " + " ".join(f"{m + ' smp/s':>16}" for m in modes) + " " + " ".join(
        f"{m + '/' + base:>16}" for m in modes[1:]
    ))  # fmt: skip
    out = []
    for i, shape in enumerate(args.shapes):
        rates = [by_mode[m][i]["service_samples_per_s"] for m in modes]
        ratios = {m: rates[j] / rates[0] for j, m in enumerate(modes)}
        out.append({"shape": str(shape), "samples_per_s": dict(zip(modes, rates, strict=True)), "ratio": ratios})
        print(
            f"  {shape!s:<20} "
            + " ".join(f"{r:>16.1f}" for r in rates)
            + " "
            + " ".join(f"{ratios[m]:>16.3f}" for m in modes[1:])
        )
    if args.json:
        print(json.dumps(out))
    return 0 if all(r["accounting_ok"] for ps in passes.values() for rs in ps for r in rs) else 1


def _run_shapes(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for shape in args.shapes:
        one = argparse.Namespace(**{**vars(args), "samples": shape.samples, "tokens": shape.tokens, "topk": shape.topk})
        results.append(_run_shape(one))
    return results


def run(args: argparse.Namespace) -> int:
    if args.shards:
        from asyncopd.lab.bench import cache_shards

        return cache_shards.run(args)
    if args.fsync:
        return _run_fsync(args)
    results = _run_shapes(args)
    path = "inline (payloads through the cache)" if args.inline else "direct (payloads in Redis, metadata to the cache)"
    print(f"cache bench: {path}, float16 log-probs, best of {args.rounds} rounds (cache CPU summed over them)")
    print(
        f"  {'shape':<20} {'MiB/sample':>10} {'service s':>10} {'raw s':>8} {'svc MiB/s':>10} "
        f"{'ratio':>6} {'cache CPU ms/sample':>20}  accounting"
    )
    for r in results:
        print(
            f"  {r['shape']:<20} {r['sample_mib']:>10.3f} {r['service_s']:>10.3f} {r['raw_s']:>8.3f} "
            f"{r['service_samples_per_s'] * r['sample_mib']:>10.1f} {r['ratio']:>6.3f} "
            f"{r['cache_cpu_ms_per_sample']:>20.3f}  {'ok' if r['accounting_ok'] else 'BROKEN'} "
            f"(produced {r['produced']}, trained {r['trained']})"
        )
        print("      phases: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["phases_s"].items()))
    if args.json:
        print(json.dumps(results))
    return 0 if all(r["accounting_ok"] for r in results) else 1
