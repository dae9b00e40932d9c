"""`asyncopd bench fleet --idle-seconds S`: what an idle fleet costs the cache.

The cache service runs in its own process as in `bench fleet` (same configuration). A control
client first takes every admission slot of the window ((eta + 1) * B tickets, held and never
answered), so no replica can be admitted and nothing reaches the teachers or the learner. Then R
rollout replicas long-poll AcquirePrompts, T teachers long-poll ClaimRollouts and the learner
long-polls PullBatch, each a thread with its own connection, with the server-side waits a
deployment asks for (`idle_waits`: rollout.acquire_wait_ms, teacher.claim_wait_ms and
learner.pull_wait_ms as configured by default, or `--idle-wait-ms` for all three). After a
settling second, the cache process's CPU over S seconds is the cost of R + T + 1 idle clients
(goal of issue #16: 256 idle replicas <= 0.05 cores).

It measures only; it knows the cache through its gRPC client.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any


def idle_cores(cpu_seconds: float, wall_seconds: float) -> float:
    """Cores the cache used while idle: CPU seconds over the wall seconds they were spent in."""
    if wall_seconds <= 0:
        raise ValueError(f"wall_seconds must be > 0, got {wall_seconds}")
    return cpu_seconds / wall_seconds


def idle_waits(wait_ms: int | None) -> dict[str, int]:
    """The server-side wait (ms) of each role's idle call: `wait_ms` for all, or the deployed
    defaults of the configuration (None)."""
    if wait_ms is not None:
        return {"AcquirePrompts": wait_ms, "ClaimRollouts": wait_ms, "PullBatch": wait_ms}
    from asyncopd.config import RunConfig

    c = RunConfig()
    return {
        "AcquirePrompts": c.rollout.acquire_wait_ms,
        "ClaimRollouts": c.teacher.claim_wait_ms,
        "PullBatch": c.learner.pull_wait_ms,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:

    from asyncopd.lab.bench.cache_shards import first_answer
    from asyncopd.lab.bench.fleet import _serve, cache_cpu_seconds, staleness_policy, stop_cache
    from asyncopd.lab.fleet.actors import RpcTimes, fleet_channel
    from asyncopd.wire.cache_client import CacheClient

    prefix = f"bench-fleet-idle-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args, prefix, child), daemon=True)
    server.start()
    channels = []
    clients: list[CacheClient] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        address = first_answer(parent, "the cache process")

        def client() -> CacheClient:
            ch = fleet_channel(address)
            channels.append(ch)
            clients.append(CacheClient(ch, logprob_dtype="float16", timeout_s=60.0))
            return clients[-1]

        control = client()
        window = staleness_policy(args).window
        held = 0
        while True:  # take the whole window: nobody else is admitted from here on
            prompts, _, _ = control.acquire_prompts("idle-holder", window)
            if not prompts:
                break
            held += len(prompts)
        times, waits = RpcTimes(), idle_waits(args.idle_wait_ms)
        errors: list[BaseException] = []

        def loop(method: str, call: Callable[[], Any]) -> threading.Thread:
            def body() -> None:
                try:
                    while not stop.is_set():
                        if times.timed(method, call):
                            raise RuntimeError(f"{method} returned work to an idle fleet")
                except BaseException as exc:  # surfaced after the run
                    errors.append(exc)
                    stop.set()

            return threading.Thread(target=body, daemon=True)

        for i in range(args.rollouts):
            rollout = client()
            acquire = partial(rollout.acquire_prompts, f"idle-{i}", args.rollout_batch, waits["AcquirePrompts"])
            threads.append(loop("AcquirePrompts", partial(_first, acquire)))
        for i in range(args.teachers):
            teacher = client()
            claim = partial(teacher.claim_rollouts, f"idle-t{i}", args.claim_batch, waits["ClaimRollouts"])
            threads.append(loop("ClaimRollouts", claim))
        learner = client()
        pull = partial(learner.pull_batch, args.batch_size, 0, waits["PullBatch"], "idle-learner")
        threads.append(loop("PullBatch", pull))
        for th in threads:
            th.start()
        time.sleep(1.0)  # every client is in its first wait
        cpu0, calls0 = cache_cpu_seconds(parent), _calls(times)
        start = time.monotonic()
        stop.wait(args.idle_seconds)
        cpu, wall = cache_cpu_seconds(parent) - cpu0, time.monotonic() - start
        calls = {m: n - calls0.get(m, 0) for m, n in _calls(times).items()}
        stop.set()
        for c in clients:  # every idle client returns from its wait now (as a stopping service does)
            c.stop_waiting()
        for th in threads:
            th.join(timeout=60.0)
        stats = control.stats_snapshot()
    finally:
        stop.set()
        for ch in channels:
            ch.close()
        stop_cache(parent, server, args.redis_url, prefix)
    if errors:
        raise RuntimeError(f"{len(errors)} idle client(s) failed; first: {errors[0]!r}") from errors[0]
    return {
        "rollouts": args.rollouts,
        "teachers": args.teachers,
        "wait_ms": waits,
        "window_held": held,
        "seconds": wall,
        "cache_cpu_seconds": cpu,
        "cache_cores": idle_cores(cpu, wall),
        "calls_per_s": {m: n / wall for m, n in sorted(calls.items())},
        "produced": stats.produced,
    }


def _first(call: Callable[[], tuple[Any, ...]]) -> Any:
    """AcquirePrompts answers (prompts, version, finished): only the prompts say work came."""
    return call()[0]


def _calls(times: Any) -> dict[str, int]:
    return {m: int(v["calls"]) for m, v in times.snapshot().items()}


def run(args: argparse.Namespace) -> int:
    rep = measure(args)
    print(
        f"fleet bench, idle: {rep['rollouts']} rollout replicas + {rep['teachers']} teachers + 1 learner "
        f"long-polling (waits, ms: {rep['wait_ms']}), admission window ({rep['window_held']}) held, "
        f"{rep['seconds']:.1f} s"
    )
    print(f"  cache CPU (service process): {rep['cache_cores']:.3f} cores ({rep['cache_cpu_seconds']:.2f} CPU s)")
    print("  calls/s: " + ", ".join(f"{m} {v:.1f}" for m, v in rep["calls_per_s"].items()))
    return 0 if rep["produced"] == 0 else 1
