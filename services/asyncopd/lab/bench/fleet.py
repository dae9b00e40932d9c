"""`asyncopd bench fleet`: many simulated replicas against the real cache service.

The cache service runs in its own process as deployed (real gRPC server, Redis at
`--redis-url` under a unique key prefix, removed afterwards). This process runs R simulated
rollout replicas, T simulated teachers and one learner stand-in, each a thread with its own
gRPC connection (see `asyncopd.lab.fleet.actors`). Simulated engines compute nothing and sleep to
emulate their configured tokens/s, so the run measures the control plane: how close the learner
gets to the ideal bottleneck throughput (min over stages of aggregate stage capacity, from the
configured rates), the staleness of trained samples, the cache's CPU seconds and the RPC
round-trip time per sample, and the accounting invariant produced = trained + dropped +
in_flight at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

from asyncopd.cache.connection import delete_prefix
from asyncopd.cache.policy import StalenessPolicy

_SUPPORT = {"none": 0, "topk": 1, "mc": 2}
_CONFIG_KEYS = (
    "rollouts",
    "teachers",
    "rollout_tps",
    "teacher_tps",
    "learner_step_s",
    "batch_size",
    "max_staleness",
    "seconds",
    "warmup_fraction",
    "mean_tokens",
    "max_tokens",
    "support",
    "k",
    "teacher_topk",
    "rollout_batch",
    "claim_batch",
    "max_tokens_in_flight",
    "stale_tokens",
    "cache_poll_ms",
    "direct",
)
# Calls that return at once (no server-side wait): their round trip is pure control-plane cost.
_NON_WAITING = ("PutRollouts", "PutScores", "AckBatch", "PublishVersion", "ReleasePrompts")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rollouts", type=int, default=16, help="simulated rollout replicas")
    parser.add_argument("--teachers", type=int, default=4, help="simulated teacher replicas")
    parser.add_argument("--rollout-tps", type=float, default=400.0, help="tokens/s one rollout replica generates")
    parser.add_argument("--teacher-tps", type=float, default=4000.0, help="tokens/s one teacher scores")
    parser.add_argument("--learner-step-s", type=float, default=0.5, help="simulated optimizer step time, s")
    parser.add_argument("--batch-size", type=int, default=32, help="learner batch size (samples)")
    parser.add_argument("--max-staleness", type=int, default=2, help="staleness bound (0 = strict sync)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the fleet runs")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.2, help="first part of the run left out of the steady-state rate"
    )
    parser.add_argument("--mean-tokens", type=float, default=256.0, help="mean response length (log-normal)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest response")
    parser.add_argument(
        "--max-tokens-in-flight",
        type=int,
        default=0,
        help="cache.max_tokens_in_flight: token budget of admission, each ticket reserving --max-tokens (0 = off)",
    )
    parser.add_argument(
        "--stale-tokens", choices=("drop", "mask"), default="drop", help="stale_tokens: drop the sample or mask them"
    )
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    parser.add_argument("--support", choices=sorted(_SUPPORT), default="topk", help="per-position rollout support")
    parser.add_argument("--k", type=int, default=8, help="support size K (student top-K or MC samples)")
    parser.add_argument("--teacher-topk", type=int, default=8, help="teacher top-K per position")
    parser.add_argument("--rollout-batch", type=int, default=4, help="prompts a rollout replica generates together")
    parser.add_argument("--claim-batch", type=int, default=8, help="rollouts a teacher claims at once")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the synthetic ids")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to use (its keys are removed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated engines")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON here ('-' = stdout)")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=0.0,
        help="> 0: measure an idle fleet instead (the window held, every client long-polling) for this long "
        "and print the cache's CPU (see asyncopd.lab.bench.fleet_idle)",
    )
    parser.add_argument(
        "--idle-wait-ms",
        type=int,
        default=None,
        help="with --idle-seconds: server-side wait of every idle call (default: each role's configured default: "
        "rollout.acquire_wait_ms, teacher.claim_wait_ms, learner.pull_wait_ms)",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="payload frames through Redis by the actors, metadata to the cache (cache.direct_payloads, the "
        "deployed default); without it payloads travel inline through the cache RPCs",
    )
    parser.add_argument(
        "--cache-poll-ms",
        type=float,
        default=250.0,
        help="cache.poll_interval_ms: how often a waiting call re-runs its script without a wake-up",
    )


def fleet_workers(clients: int) -> int:
    """The cache's gRPC workers for `clients` long-polling actors: the deployed default, or enough
    that every actor may wait beside the reserve kept for non-waiting calls."""
    from asyncopd.cache.waits import workers_for
    from asyncopd.config.endpoints import CacheServerConfig

    return max(CacheServerConfig().workers, workers_for(clients))


def _config(args: argparse.Namespace, prefix: str) -> Any:
    from asyncopd.config import config_from_dict

    return config_from_dict(
        {
            "max_staleness": args.max_staleness,
            "stale_tokens": args.stale_tokens,
            "learner": {"batch_size": args.batch_size},
            "rollout": {"sampling": {"max_tokens": args.max_tokens}},  # what each ticket reserves
            "redis": {"url": args.redis_url, "key_prefix": prefix},
            "cache": {
                "hold_until_learner": False,  # admission opens without a learner's begin
                # every actor may hold one long-polling call (the deployed workers, more for a larger fleet)
                "server": {
                    "port": 0,
                    "workers": fleet_workers(args.rollouts + args.teachers + 1),
                    "max_message_mb": 256,
                },
                "byte_budget_mb": 4096.0,
                "max_request_mb": 200.0,
                "eviction": "backpressure",
                "max_tokens_in_flight": args.max_tokens_in_flight,
                "poll_interval_ms": args.cache_poll_ms,
            },
        }
    )


def cache_cpu_seconds(parent: Connection) -> float:
    """The CPU seconds the `_serve` child has used so far."""
    parent.send("cpu")
    return float(parent.recv())


def stop_cache(parent: Connection, server: Any, redis_url: str, prefix: str) -> None:
    """Stop the `_serve` child and delete the run's keys."""
    import redis

    parent.send("stop")
    server.join(timeout=30)
    r = redis.Redis.from_url(redis_url)
    delete_prefix(r, prefix)
    r.close()


def _serve(args: argparse.Namespace, prefix: str, conn: Connection) -> None:
    """Child process: the cache service; answers 'cpu' with its CPU seconds until 'stop'."""
    from asyncopd.cache.main import start_cache
    from asyncopd.tasks import PromptItem

    prompts = [PromptItem(f"fleet/{i}", f"q{i}", "0", "toy") for i in range(4096)]
    ids = [1 + i % (args.vocab - 1) for i in range(args.prompt_tokens)]
    cache = start_cache(
        _config(args, prefix),
        "cache-fleet",
        prompts=prompts,
        tokenize=lambda _: ids,
        vocab_size=args.vocab,
        serve_metrics=False,
    )
    conn.send(cache.address)
    while conn.recv() == "cpu":
        conn.send(time.process_time())
    cache.stop(grace=1.0)


def ideal_rates(args: argparse.Namespace, mean_tokens: float) -> dict[str, float]:
    """Aggregate capacity of each stage in samples/s, from the configured rates."""
    return {
        "rollout": args.rollouts * args.rollout_tps / mean_tokens,
        "teacher": args.teachers * args.teacher_tps / mean_tokens,
        "learner": args.batch_size / args.learner_step_s,
    }


def staleness_policy(args: argparse.Namespace) -> StalenessPolicy:
    """The cache's staleness rules for this run's bound and learner batch."""
    return StalenessPolicy(args.max_staleness, args.batch_size, args.stale_tokens)


def admission_bound(args: argparse.Namespace, mean_tokens: float) -> float:
    """Little's law on the staleness window: at most `StalenessPolicy.window` samples are admitted
    and not yet trained, and each is held at least as long as its rollout batch takes to
    generate, so throughput <= window / generation time. Not a stage capacity: an upper bound the
    staleness bound puts on the whole pipeline (the min over stages does not see it)."""
    return staleness_policy(args).window / (args.rollout_batch * mean_tokens / args.rollout_tps)


def _check(args: argparse.Namespace) -> None:
    for name in ("rollouts", "teachers", "batch_size", "rollout_batch", "claim_batch", "k", "teacher_topk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("rollout_tps", "teacher_tps", "learner_step_s", "seconds", "mean_tokens"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.warmup_fraction < 1:
        raise SystemExit(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    if args.max_staleness < 0:
        raise SystemExit(f"--max-staleness must be >= 0, got {args.max_staleness}")
    if not 1 <= args.mean_tokens <= args.max_tokens:
        raise SystemExit(f"--mean-tokens must be in 1..--max-tokens ({args.max_tokens}), got {args.mean_tokens}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the fleet once and return the report (see the module docstring for what it holds)."""
    import redis

    from asyncopd.lab.fleet.actors import (
        LearnerLog,
        RpcTimes,
        fleet_channel,
        learner_actor,
        rollout_actor,
        teacher_actor,
    )
    from asyncopd.lab.fleet.engines import LengthModel, SimulatedRollout, SimulatedTeacher, SimulatedWeights
    from asyncopd.records import SupportKind
    from asyncopd.wire.cache_client import CacheClient

    _check(args)
    prefix = f"bench-fleet-{uuid.uuid4().hex[:8]}"
    lengths = LengthModel(args.mean_tokens, args.max_tokens)
    mean_tokens = lengths.expected()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args, prefix, child), daemon=True)
    server.start()
    channels = []
    # --direct: the actors write and read payload frames in Redis themselves (one pool for all
    # threads, a connection each), the cache sees metadata only
    frames = None
    if args.direct:
        from asyncopd.wire.payload_store import READ_SIZE, PayloadStore

        pool_size = args.rollouts + args.teachers + 8
        redis_client = redis.Redis.from_url(args.redis_url, max_connections=pool_size, socket_read_size=READ_SIZE)
        frames = PayloadStore(redis_client, prefix)
    try:
        address = parent.recv()

        def client() -> CacheClient:
            ch = fleet_channel(address)
            channels.append(ch)
            return CacheClient(ch, logprob_dtype="float16", timeout_s=60.0, payloads=frames)

        weights, times, record, stop = SimulatedWeights(), RpcTimes(), LearnerLog(), threading.Event()
        support = SupportKind(_SUPPORT[args.support])
        engines = [
            SimulatedRollout(
                f"sim-rollout-{i}",
                weights,
                tokens_per_s=args.rollout_tps,
                lengths=lengths,
                support_kind=support,
                k=args.k,
                vocab_size=args.vocab,
                seed=args.seed * 100_003 + i,
            )
            for i in range(args.rollouts)
        ]
        teachers = [
            SimulatedTeacher(
                f"sim-teacher-{i}",
                tokens_per_s=args.teacher_tps,
                topk=args.teacher_topk,
                vocab_size=args.vocab,
                seed=args.seed * 100_003 + 50_000 + i,
            )
            for i in range(args.teachers)
        ]
        errors: list[BaseException] = []

        def guarded(fn: Any, *a: Any, **kw: Any) -> threading.Thread:
            def body() -> None:
                try:
                    fn(*a, **kw)
                except BaseException as exc:  # surfaced after the run; the fleet stops at once
                    errors.append(exc)
                    stop.set()

            return threading.Thread(target=body, daemon=True)

        wait_ms = 200
        threads = [
            guarded(rollout_actor, e, client(), times, stop, batch_size=args.rollout_batch, wait_ms=wait_ms)
            for e in engines
        ]
        threads += [
            guarded(teacher_actor, t, client(), times, stop, claim_batch=args.claim_batch, wait_ms=wait_ms)
            for t in teachers
        ]
        threads.append(
            guarded(
                learner_actor,
                client(),
                weights,
                times,
                stop,
                record,
                batch_size=args.batch_size,
                step_s=args.learner_step_s,
                wait_ms=wait_ms,
                mask=staleness_policy(args) if args.stale_tokens == "mask" else None,
            )
        )
        control = client()
        cache_cpu0 = cache_cpu_seconds(parent)
        own_cpu0, start = time.process_time(), time.monotonic()
        record.start = start
        for th in threads:
            th.start()
        stop.wait(args.seconds)
        stop.set()
        for th in threads:
            th.join(timeout=60)
        wall = time.monotonic() - start
        own_cpu = time.process_time() - own_cpu0
        cache_cpu = cache_cpu_seconds(parent) - cache_cpu0
        stuck = [th.name for th in threads if th.is_alive()]
        control.publish_version(weights.version, finished=True)
        stats = control.stats_snapshot()
    finally:
        for ch in channels:
            ch.close()
        if frames is not None:
            frames.close()
        stop_cache(parent, server, args.redis_url, prefix)
    if errors:
        raise RuntimeError(f"{len(errors)} actor(s) failed; first: {errors[0]!r}") from errors[0]
    if stuck:
        raise RuntimeError(f"actors did not stop within 60 s: {stuck[:5]}")
    return _report(
        args,
        mean_tokens=mean_tokens,
        record=record,
        times=times,
        stats=stats,
        wall=wall,
        cache_cpu=cache_cpu,
        own_cpu=own_cpu,
        engines=engines,
        teachers=teachers,
    )


def _report(
    args: argparse.Namespace,
    *,
    mean_tokens: float,
    record: Any,
    times: Any,
    stats: Any,
    wall: float,
    cache_cpu: float,
    own_cpu: float,
    engines: list[Any],
    teachers: list[Any],
) -> dict[str, Any]:
    ideal = ideal_rates(args, mean_tokens)
    bottleneck = min(ideal, key=lambda k: ideal[k])
    steps = record.steps
    trained_samples = sum(s[1] for s in steps)
    trained_tokens = sum(s[2] for s in steps)
    # Steady state: after the warm-up (pipeline fill), samples per second between the first and
    # the last step completed in the rest of the run (step-to-step, so no partial step counts).
    warm_end = record.start + args.warmup_fraction * wall
    late = [s for s in steps if s[0] >= warm_end]
    window = late[-1][0] - late[0][0] if len(late) >= 2 else 0.0
    steady_samples = sum(s[1] for s in late[1:]) / window if window > 0 else 0.0
    steady_tokens = sum(s[2] for s in late[1:]) / window if window > 0 else 0.0
    rpc = times.snapshot()
    control_rtt = sum(rpc[m]["seconds"] for m in _NON_WAITING if m in rpc)
    served = dict(sorted(stats.staleness_served.items()))
    trained_staleness = record.staleness
    histogram: dict[int, int] = {}
    for s in trained_staleness:
        histogram[s] = histogram.get(s, 0) + 1
    return {
        "config": {k: getattr(args, k) for k in _CONFIG_KEYS},
        "mean_response_tokens": mean_tokens,
        "ideal_samples_per_s": ideal,
        "bottleneck": bottleneck,
        "ideal_bottleneck_samples_per_s": ideal[bottleneck],
        "ideal_bottleneck_tokens_per_s": ideal[bottleneck] * mean_tokens,
        "admission_bound_samples_per_s": admission_bound(args, mean_tokens),
        "steps": len(steps),
        "wall_seconds": wall,
        "samples_trained": trained_samples,
        "tokens_trained": trained_tokens,
        "steady_window_seconds": window,
        "learner_samples_per_s": steady_samples,
        "learner_tokens_per_s": steady_tokens,
        "learner_samples_per_s_whole_run": trained_samples / wall,
        "efficiency": steady_samples / ideal[bottleneck] if ideal[bottleneck] else 0.0,
        "rollout_tokens_per_s": sum(e.tokens_generated for e in engines) / wall,
        "teacher_tokens_per_s": sum(t.tokens_scored for t in teachers) / wall,
        "staleness_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "staleness_served": {str(k): v for k, v in served.items()},
        "max_staleness_trained": max(trained_staleness, default=0),
        "cache_cpu_seconds": cache_cpu,
        "cache_cpu_ms_per_sample": 1000 * cache_cpu / max(1, stats.produced),
        "cache_cpu_fraction": cache_cpu / wall,
        "fleet_cpu_seconds": own_cpu,
        "fleet_cpu_fraction": own_cpu / wall,
        "control_rtt_ms_per_sample": 1000 * control_rtt / max(1, stats.produced),
        "rpc": {m: {"calls": v["calls"], "mean_ms": 1000 * v["seconds"] / max(1, v["calls"])} for m, v in rpc.items()},
        "produced": stats.produced,
        "trained": stats.trained,
        "dropped": dict(stats.dropped),
        "drop_rate": sum(stats.dropped.values()) / max(1, stats.produced),
        "masked_tokens": record.masked_tokens,
        "masked_token_fraction": record.masked_tokens / max(1, trained_tokens + record.masked_tokens),
        "in_flight": stats.in_flight,
        "invariant_holds": stats.invariant_holds(),
        "cores": os.cpu_count(),
    }


def print_table(rep: dict[str, Any]) -> None:
    c = rep["config"]
    ideal = rep["ideal_samples_per_s"]
    print(
        f"fleet bench: {c['rollouts']} rollouts x {c['rollout_tps']:g} tok/s, {c['teachers']} teachers x "
        f"{c['teacher_tps']:g} tok/s, learner B={c['batch_size']} step {c['learner_step_s']:g}s, "
        f"max_staleness {c['max_staleness']}, {rep['wall_seconds']:.1f}s, mean response "
        f"{rep['mean_response_tokens']:.0f} tokens, support {c['support']} K={c['k']}, "
        f"teacher top-{c['teacher_topk']}, {'direct' if c['direct'] else 'inline'} payloads"
    )
    print("  ideal capacity (samples/s): " + ", ".join(f"{k} {v:.1f}" for k, v in ideal.items()))
    rows = [
        ("learner samples/s (steady)", f"{rep['learner_samples_per_s']:.2f}"),
        ("learner tokens/s (steady)", f"{rep['learner_tokens_per_s']:.0f}"),
        (f"ideal bottleneck ({rep['bottleneck']}) samples/s", f"{rep['ideal_bottleneck_samples_per_s']:.2f}"),
        ("achieved / ideal", f"{rep['efficiency']:.3f}"),
        ("staleness-window bound samples/s (<=)", f"{rep['admission_bound_samples_per_s']:.2f}"),
        ("steps / samples trained", f"{rep['steps']} / {rep['samples_trained']}"),
        ("rollout / teacher tokens/s", f"{rep['rollout_tokens_per_s']:.0f} / {rep['teacher_tokens_per_s']:.0f}"),
        ("staleness of trained samples", json.dumps(rep["staleness_histogram"])),
        ("dropped / produced", f"{rep['drop_rate']:.4f} {rep['dropped']}"),
        ("masked stale tokens (fraction)", f"{rep['masked_tokens']} ({rep['masked_token_fraction']:.4f})"),
        ("staleness served (cache Stats)", json.dumps(rep["staleness_served"])),
        ("cache CPU ms / produced sample", f"{rep['cache_cpu_ms_per_sample']:.2f}"),
        ("cache CPU (service process)", f"{rep['cache_cpu_fraction']:.2f} cores"),
        ("fleet CPU (this process)", f"{rep['fleet_cpu_fraction']:.2f} cores"),
        ("non-waiting RPC RTT ms / sample", f"{rep['control_rtt_ms_per_sample']:.2f}"),
        (
            "produced = trained + dropped + in_flight",
            f"{rep['produced']} = {rep['trained']} + {sum(rep['dropped'].values())} {rep['dropped']} "
            f"+ {rep['in_flight']}"
            f"  {'ok' if rep['invariant_holds'] else 'BROKEN'}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("  RPC mean ms: " + ", ".join(f"{m} {v['mean_ms']:.1f} (x{v['calls']})" for m, v in rep["rpc"].items()))


def run(args: argparse.Namespace) -> int:
    if args.idle_seconds > 0:
        from asyncopd.lab.bench import fleet_idle

        return fleet_idle.run(args)
    rep = measure(args)
    print_table(rep)
    if args.json:
        text = json.dumps(rep, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    ok = rep["invariant_holds"] and staleness_policy(args).within_bound(rep["max_staleness_trained"])
    return 0 if ok else 1
