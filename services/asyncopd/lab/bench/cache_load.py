"""`asyncopd bench cache-load`: many concurrent producers and consumers against one cache service.

The cache service runs in its own process on loopback (as deployed, against the configured
Redis under a fresh key prefix, wiped afterwards). Threads in this process play the pipeline:
P rollout producers (AcquirePrompts -> PutRollouts), T teachers (ClaimRollouts -> PutScores) and
one learner (PullBatch -> AckBatch -> PublishVersion). `--load-processes K` spreads the producers
and teachers over K processes (the learner stays here), so the load is not held to one
interpreter's GIL where the machine has cores to spare. The run is bounded by --duration seconds
and --max-steps learner steps, whichever comes first; then producers stop, the pipeline drains
for up to --drain seconds, and the accounting is checked: produced = trained + dropped +
in_flight exactly, every trained sample trained once, versions monotonic. It prints sustained
ops/s and p50/p99 latency per RPC. It knows nothing of models: rollouts are synthetic.

Then, on the same cache process, its gRPC floor: the cache CPU per `grpc.health.v1` Check (an
RPC whose handler does nothing) from `--floor-callers` concurrent callers. The floor bounds
what any servicer could reach in this server (1 / floor RPC per CPU-second); what the load costs
per RPC above it is the cache's own work (parsing, Redis round trips, waits).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

import numpy as np

from asyncopd.cache.connection import delete_prefix

VOCAB = 512
T = TypeVar("T")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--producers", type=int, default=16, help="rollout producer threads")
    parser.add_argument("--teachers", type=int, default=8, help="teacher threads")
    parser.add_argument("--batch-size", type=int, default=32, help="learner batch size")
    parser.add_argument("--max-staleness", type=int, default=2, help="staleness bound of the run")
    parser.add_argument("--chunk", type=int, default=4, help="items per acquire/put/claim request")
    parser.add_argument("--tokens", type=int, default=128, help="response tokens per rollout")
    parser.add_argument("--topk", type=int, default=16, help="teacher top-K per position")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (at most 30)")
    parser.add_argument("--max-steps", type=int, default=100_000, help="stop after this many learner steps")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to let the pipeline drain")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to use (keys are removed)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    parser.add_argument("--floor-calls", type=int, default=2000, help="health checks that measure the gRPC floor")
    parser.add_argument("--floor-callers", type=int, default=8, help="threads that send them")
    parser.add_argument(
        "--solo-cycles",
        type=int,
        default=0,
        help="then N cycles of one caller at a time (acquire, put, claim, score x batch/chunk; pull, ack, "
        "publish): the cache CPU each kind of RPC costs with nothing else in flight",
    )
    parser.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="processes the producer and teacher threads are spread over (1: all in this process); more lets "
        "the load outrun one interpreter's GIL on a machine with cores to spare",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="payload frames through Redis, metadata to the cache (cache.direct_payloads, the deployed default); "
        "without it payloads travel inline through the cache RPCs",
    )


def _config(args: argparse.Namespace, prefix: str) -> Any:
    from asyncopd.config import config_from_dict

    return config_from_dict(
        {
            "max_staleness": args.max_staleness,
            "learner": {"batch_size": args.batch_size},
            "redis": {"url": args.redis_url, "key_prefix": prefix},
            "cache": {"server": {"port": 0, "workers": 64}, "byte_budget_mb": 4096.0, "hold_until_learner": False},
        }
    )


def _tokenize(text: str) -> list[int]:
    return [1 + (ord(c) % (VOCAB - 1)) for c in text]


def _serve(args: argparse.Namespace, prefix: str, conn: Connection) -> None:
    """Child process: the cache service over synthetic prompts, until told to stop."""
    from asyncopd.cache.main import start_cache
    from asyncopd.tasks import PromptItem

    prompts = [PromptItem(prompt_id=f"p/{i}", prompt=f"{i}+{i}=", answer=str(2 * i), grader="toy") for i in range(4096)]
    cache = start_cache(
        _config(args, prefix), "cache-load", prompts=prompts, tokenize=_tokenize, vocab_size=VOCAB, serve_metrics=False
    )
    conn.send(cache.address)
    while conn.recv() == "cpu":  # CPU seconds of this process, all threads (the gRPC workers)
        conn.send(time.process_time())
    cache.stop(grace=1.0)


@dataclass
class Recorder:
    """Latencies per RPC, appended from many threads: (seconds, monotonic clock at the end). The
    clock is the system's, so records from several processes are counted against one deadline."""

    lat: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, rpc: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        t0 = time.perf_counter()
        out = call(*args, **kwargs)
        dt = time.perf_counter() - t0
        with self.lock:
            self.lat[rpc].append((dt, time.monotonic()))
        return out

    def merge(self, lat: dict[str, list[tuple[float, float]]]) -> None:
        with self.lock:
            for rpc, records in lat.items():
                self.lat[rpc].extend(records)

    def ended_by(self, deadline: float) -> int:
        """RPCs that ended by `deadline` (time.monotonic)."""
        with self.lock:
            return sum(1 for records in self.lat.values() for _, end in records if end <= deadline)


class _Flag(Protocol):
    """threading.Event or multiprocessing's Event: what the load's threads watch and set."""

    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class _Stops:
    """`producing`: producers stop (the load's end); `all`: teachers and the learner stop too."""

    producing: _Flag
    all: _Flag

    def fail(self) -> None:
        self.producing.set()
        self.all.set()


def _rollout(prompt: Any, version: int, tokens: int, rng: np.random.Generator) -> Any:
    from asyncopd.records import Rollout, SupportKind

    return Rollout(
        sample_id=f"{prompt.ticket}/s",
        prompt_id=prompt.prompt_id,
        ticket=prompt.ticket,
        task=prompt.task,
        prompt_ids=prompt.prompt_ids,
        response_ids=rng.integers(1, VOCAB, tokens).astype(np.int32),
        behavior_logprobs=-rng.random(tokens).astype(np.float32),
        versions=np.full(tokens, version, np.int32),
        support_kind=SupportKind.NONE,
        replica="load",
    )


def _scores(rollout: Any, topk: int, rng: np.random.Generator) -> Any:
    from asyncopd.records import TeacherScores

    t = rollout.num_tokens
    return TeacherScores(
        sample_id=rollout.sample_id,
        token_logprobs=-rng.random(t).astype(np.float32),
        topk_ids=rng.integers(0, VOCAB, (t, topk)).astype(np.int32),
        topk_logprobs=-rng.random((t, topk)).astype(np.float32) * 4,
        teacher="load",
    )


def grpc_floor_s(ch: Any, cpu: Callable[[], float], calls: int, callers: int) -> float:
    """Cache CPU seconds per `grpc.health.v1` Check (a handler that does nothing), `calls` of
    them from `callers` threads over channel `ch`: the server's own cost per RPC."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub, request = health_pb2_grpc.HealthStub(ch), health_pb2.HealthCheckRequest(service="")
    per = max(1, calls // max(1, callers))

    def loop() -> None:
        for _ in range(per):
            stub.Check(request, timeout=30.0)

    loop()  # warm the connection and the server's threads
    threads = [threading.Thread(target=loop, name=f"floor-{i}") for i in range(max(1, callers))]
    cpu0 = cpu()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (cpu() - cpu0) / (per * len(threads))


def solo_cpu_us(client: Any, args: argparse.Namespace, cpu: Callable[[], float], cycles: int) -> dict[str, float]:
    """Cache CPU microseconds per RPC, by kind, one caller at a time: each call is bracketed by
    two readings of the cache's CPU, less what a reading itself costs (measured likewise)."""
    cost: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(rpc: str, call: Callable[..., T], *call_args: Any, **kwargs: Any) -> T:
        c0 = cpu()
        out = call(*call_args, **kwargs)
        cost[rpc] += cpu() - c0
        calls[rpc] += 1
        return out

    probe = min(-(cpu() - cpu()) for _ in range(20))  # one reading's own CPU, at its quietest
    rng = np.random.default_rng(7)
    version = client.stats_snapshot().learner_version
    for _ in range(cycles):
        for _ in range(max(1, args.batch_size // args.chunk)):
            prompts, v, _ = timed("AcquirePrompts", client.acquire_prompts, "solo", args.chunk)
            if prompts:
                timed("PutRollouts", client.put_rollouts, [_rollout(p, v, args.tokens, rng) for p in prompts])
            claimed = timed("ClaimRollouts", client.claim_rollouts, "solo", args.chunk)
            if claimed:
                timed("PutScores", client.put_scores, [_scores(r, args.topk, rng) for r in claimed])
        batch = timed("PullBatch", client.pull_batch, args.batch_size, version, wait_ms=1000)
        if batch is not None:
            timed("AckBatch", client.ack_batch, batch.batch_id)
            version += 1
            timed("PublishVersion", client.publish_version, version)
    return {rpc: max(0.0, 1e6 * (cost[rpc] / calls[rpc] - probe)) for rpc in sorted(cost)}


def _guard(body: Callable[[], None], errors: list[str], stops: _Stops) -> Callable[[], None]:
    """`body`, whose failure fails the run: reported, and every thread told to stop (no hang)."""

    def run() -> None:
        try:
            body()
        except Exception as exc:
            errors.append(f"{threading.current_thread().name}: {exc!r}")
            stops.fail()

    return run


def _role_threads(
    client: Any,
    args: argparse.Namespace,
    rec: Recorder,
    errors: list[str],
    stops: _Stops,
    *,
    producers: range,
    teachers: range,
) -> list[threading.Thread]:
    """Unstarted threads: rollout producers `producers` (until `stops.producing`) and teachers
    `teachers` (until `stops.all`), each numbered as in a one-process run."""

    def producer(i: int) -> None:
        rng = np.random.default_rng(i)
        while not stops.producing.is_set():
            prompts, version, finished = rec.timed(
                "AcquirePrompts", lambda: client.acquire_prompts(f"r{i}", args.chunk, wait_ms=100)
            )
            if finished:
                return
            if prompts:
                rollouts = [_rollout(p, version, args.tokens, rng) for p in prompts]
                rec.timed("PutRollouts", client.put_rollouts, rollouts)

    def teacher(j: int) -> None:
        rng = np.random.default_rng(1000 + j)
        while not stops.all.is_set():
            claimed = rec.timed("ClaimRollouts", lambda: client.claim_rollouts(f"t{j}", args.chunk, wait_ms=100))
            if claimed:
                scores = [_scores(r, args.topk, rng) for r in claimed]
                rec.timed("PutScores", client.put_scores, scores)

    threads = [
        threading.Thread(target=_guard(functools.partial(producer, i), errors, stops), name=f"producer-{i}")
        for i in producers
    ]
    return threads + [
        threading.Thread(target=_guard(functools.partial(teacher, j), errors, stops), name=f"teacher-{j}")
        for j in teachers
    ]


def _payload_store(args: argparse.Namespace, prefix: str) -> Any:
    """The payload client a deployed producer or reader makes (`PayloadStore.from_config`)."""
    from asyncopd.config.redis import RedisConfig
    from asyncopd.wire.payload_store import PayloadStore

    return PayloadStore.from_config(RedisConfig(url=args.redis_url, key_prefix=prefix))


def _load_process(
    address: str,
    args: argparse.Namespace,
    stops: _Stops,
    go: _Flag,
    conn: Connection,
    *,
    k: int,
    payload_prefix: str | None,
) -> None:
    """Child process `k` of `--load-processes`: every K-th producer and teacher, from k. Says
    "ready" once its client is up, starts them on `go` (the load's clock starts when every
    child is ready), runs until `stops.all`, then sends back its latencies and errors."""
    from asyncopd.wire.cache_client import CacheClient
    from asyncopd.wire.rpc import channel

    driver = os.getppid()
    rec, errors = Recorder(), list[str]()
    store = _payload_store(args, payload_prefix) if payload_prefix is not None else None
    ch = channel(address)
    try:
        client = CacheClient(ch, timeout_s=60.0, payloads=store)
        n = args.load_processes
        threads = _role_threads(
            client, args, rec, errors, stops, producers=range(k, args.producers, n), teachers=range(k, args.teachers, n)
        )
        conn.send("ready")
        while not go.wait(1.0):
            if os.getppid() != driver:  # the driver is gone: no one will start or stop this load
                return
        for t in threads:
            t.start()
        while not stops.all.wait(1.0):
            if os.getppid() != driver:  # the driver is gone: stop rather than load an orphaned cache
                stops.fail()
        for t in threads:
            t.join(timeout=30)
    except Exception as exc:  # the run fails with the reason, rather than waiting on a silent child
        errors.append(f"load process {k}: {exc!r}")
        stops.fail()
    finally:
        ch.close()
        if store is not None:
            store.close()
    with contextlib.suppress(OSError):  # a driver that is gone reads nothing
        conn.send((dict(rec.lat), errors))


def _receive(conn: Connection, timeout_s: float) -> Any:
    """The next message from a load process, or None when none comes in time or it is gone."""
    try:
        return conn.recv() if conn.poll(timeout_s) else None
    except (EOFError, OSError):
        return None


def drive(
    address: str, args: argparse.Namespace, payloads: Any = None, cpu: Callable[[], float] | None = None
) -> dict[str, Any]:
    """Run the load against a cache at `address`; returns the measured figures and checks.
    `payloads`: a PayloadStore for direct frames (None: inline); `cpu`: the cache process's CPU
    seconds so far (its CPU over the load is reported when given). With `args.load_processes`
    > 1 the producers and teachers run in that many child processes (their own clients)."""
    from asyncopd.wire.cache_client import CacheClient
    from asyncopd.wire.rpc import channel

    rec = Recorder()
    errors: list[str] = []
    trained_ids: list[str] = []
    versions_seen: list[int] = []
    ch = channel(address)
    client = CacheClient(ch, timeout_s=60.0, payloads=payloads)
    n_proc = args.load_processes
    ctx = mp.get_context("spawn")
    stops = _Stops(ctx.Event(), ctx.Event()) if n_proc > 1 else _Stops(threading.Event(), threading.Event())
    go = ctx.Event() if n_proc > 1 else threading.Event()  # children start their threads on it

    def learner() -> None:
        version = client.stats_snapshot().learner_version
        while not stops.all.is_set() and len(versions_seen) < args.max_steps:
            batch = rec.timed("PullBatch", client.pull_batch, args.batch_size, version, wait_ms=200)
            if batch is None:
                continue
            trained_ids.extend(s.rollout.sample_id for s in batch.samples)
            rec.timed("AckBatch", client.ack_batch, batch.batch_id)
            version += 1
            rec.timed("PublishVersion", client.publish_version, version)
            versions_seen.append(version)
        stops.producing.set()

    threads: list[threading.Thread] = []
    children: list[tuple[Any, Connection]] = []
    if n_proc == 1:
        threads = _role_threads(
            client, args, rec, errors, stops, producers=range(args.producers), teachers=range(args.teachers)
        )
    else:
        prefix = payloads.prefix if payloads is not None else None
        for k in range(n_proc):
            mine, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_load_process,
                args=(address, args, stops, go, theirs),
                kwargs={"k": k, "payload_prefix": prefix},
                name=f"load-{k}",
                daemon=True,
            )
            children.append((proc, mine))
    learner_thread = threading.Thread(target=_guard(learner, errors, stops), name="learner")
    early: dict[str, Any] = {}  # a child's result sent instead of "ready" (it failed starting)
    for proc, _ in children:
        proc.start()
    for proc, mine in children:  # the clock starts when every child can send load
        msg = _receive(mine, 120.0)
        if msg is None:
            errors.append(f"{proc.name}: not ready within 120 s (exit code {proc.exitcode})")
            stops.fail()
        elif msg != "ready":
            early[proc.name] = msg
    go.set()
    cpu0 = cpu() if cpu is not None else 0.0
    t0 = time.perf_counter()
    for t in [*threads, learner_thread]:
        t.start()
    stops.producing.wait(min(args.duration, 30.0))
    stops.producing.set()
    load_end = time.monotonic()
    load_s = time.perf_counter() - t0
    cache_cpu_s = cpu() - cpu0 if cpu is not None else None
    # Drain: the learner and teachers go on until nothing is in flight or the drain time is up.
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline and not errors:
        s = client.stats_snapshot()
        if s.in_flight < args.batch_size:  # a partial batch is never served; it stays counted
            break
        time.sleep(0.2)
    stops.all.set()
    for t in [*threads, learner_thread]:
        t.join(timeout=30)
    for proc, mine in children:
        result = early.get(proc.name)
        while result is None and (msg := _receive(mine, 60.0)) is not None:
            result = None if msg == "ready" else msg  # a late "ready" comes first
        if result is not None:
            lat, child_errors = result
            rec.merge(lat)
            errors.extend(child_errors)
        else:
            errors.append(f"{proc.name}: sent no result (exit code {proc.exitcode})")
        proc.join(timeout=30)
    ops_during_load = rec.ended_by(load_end)
    final = client.stats_snapshot()
    floor_s = grpc_floor_s(ch, cpu, args.floor_calls, args.floor_callers) if cpu is not None else None
    solo = solo_cpu_us(client, args, cpu, args.solo_cycles) if cpu is not None and args.solo_cycles > 0 else None
    ch.close()
    per_rpc = {}
    for rpc, v in sorted(rec.lat.items()):
        p50, p99 = np.percentile([dt for dt, _ in v], [50, 99]) * 1e3
        per_rpc[rpc] = {"calls": len(v), "p50_ms": float(p50), "p99_ms": float(p99)}
    dropped = sum(final.dropped.values())
    return {
        "producers": args.producers,
        "teachers": args.teachers,
        "load_processes": n_proc,
        "load_s": load_s,
        "ops": ops_during_load,
        "ops_per_s": ops_during_load / load_s,
        "path": "direct" if payloads is not None else "inline",
        "cache_cpu_s": cache_cpu_s,
        "ops_per_cache_cpu_s": ops_during_load / cache_cpu_s if cache_cpu_s else None,
        "cache_cpu_us_per_rpc": 1e6 * cache_cpu_s / ops_during_load if cache_cpu_s and ops_during_load else None,
        "grpc_floor_cpu_us": 1e6 * floor_s if floor_s is not None else None,
        "solo_cpu_us": solo,
        "samples_trained_per_s": len(trained_ids) / max(load_s, 1e-9),
        "per_rpc": per_rpc,
        "produced": final.produced,
        "trained": final.trained,
        "dropped": dropped,
        "dropped_by_reason": dict(final.dropped),
        "in_flight": final.in_flight,
        "steps": len(versions_seen),
        "invariant_holds": final.produced == final.trained + dropped + final.in_flight,
        "trained_twice": len(trained_ids) - len(set(trained_ids)),
        "trained_matches": len(trained_ids) == final.trained,
        "versions_monotonic": versions_seen == sorted(set(versions_seen)),
        "errors": errors,
    }


def ok(result: dict[str, Any]) -> bool:
    """Zero loss: exact accounting (drops, e.g. too stale, are counted by reason, never silent),
    nothing trained twice, versions monotonic, no worker failed."""
    return bool(
        result["invariant_holds"]
        and result["trained_twice"] == 0
        and result["trained_matches"]
        and result["versions_monotonic"]
        and not result["errors"]
    )


def run(args: argparse.Namespace) -> int:
    import redis

    if args.load_processes < 1:
        raise SystemExit(f"--load-processes {args.load_processes}: must be at least 1")
    prefix = f"bench-cache-load-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args, prefix, child), daemon=True)
    server.start()
    store = None
    if args.direct:
        store = _payload_store(args, prefix)

    def cpu() -> float:
        parent.send("cpu")
        return float(parent.recv())

    try:
        result = drive(parent.recv(), args, store, cpu)
    finally:
        if store is not None:
            store.close()
        parent.send("stop")
        server.join(timeout=30)
        raw = redis.Redis.from_url(args.redis_url)
        delete_prefix(raw, prefix)
        raw.close()
    _print(result)
    if args.json:
        print(json.dumps(result))
    return 0 if ok(result) else 1


def _processes(n: int) -> str:
    return "one load process" if n == 1 else f"producers and teachers over {n} load processes"


def _print(result: dict[str, Any]) -> None:
    print(
        f"cache-load ({result['path']} payloads): {result['producers']} producers, {result['teachers']} teachers, "
        f"1 learner ({_processes(result['load_processes'])}), "
        f"{result['load_s']:.1f} s: {result['ops_per_s']:.0f} RPC/s sustained, "
        f"{result['samples_trained_per_s']:.0f} samples trained/s, {result['steps']} learner steps"
    )
    if result["cache_cpu_s"] is not None:
        print(
            f"cache process CPU over the load: {result['cache_cpu_s']:.2f} s "
            f"({result['cache_cpu_s'] / result['load_s']:.2f} cores), "
            f"{result['ops_per_cache_cpu_s']:.0f} RPC per cache CPU second"
        )
    if result["grpc_floor_cpu_us"] is not None and result["cache_cpu_us_per_rpc"] is not None:
        floor, per = result["grpc_floor_cpu_us"], result["cache_cpu_us_per_rpc"]
        print(
            f"gRPC floor of this cache process: {floor:.0f} us of CPU per empty RPC (health check), at most "
            f"{1e6 / floor:.0f} RPC per CPU second; the load cost {per:.0f} us per RPC, "
            f"{per - floor:.0f} us of it the cache's own work"
        )
    solo = result["solo_cpu_us"] or {}
    print(
        f"{'rpc':<16}{'calls':>8}{'p50 ms':>10}{'p99 ms':>10}" + (f"{'cache CPU us, one caller':>26}" if solo else "")
    )
    for rpc, r in result["per_rpc"].items():
        alone = f"{solo[rpc]:>26.0f}" if rpc in solo else ""
        print(f"{rpc:<16}{r['calls']:>8}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{alone}")
    print(
        f"accounting: produced {result['produced']} = trained {result['trained']} + dropped {result['dropped']} "
        f"+ in_flight {result['in_flight']}: {'exact' if result['invariant_holds'] else 'BROKEN'} "
        f"(dropped by reason: {result['dropped_by_reason'] or 'none'}); "
        f"trained twice: {result['trained_twice']}; errors: {result['errors'] or 'none'}"
    )
