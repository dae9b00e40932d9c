"""`asyncopd bench grpc-floor`: the CPU one gRPC Python server spends per RPC whose handler does
nothing, for the thread-pool server the services run (`grpc.server`) and for the asyncio one
(`grpc.aio.server`), side by side.

Why: a cache process's own work per RPC is measured against this floor (`bench cache-load`
prints both). If the asyncio server's floor were much lower, moving the services onto it would
raise what one process can serve; this measures whether it is. `--redis-calls N` makes each
handler do N round trips to Redis first (EVALSHA of a one-line script, as the cache's handlers
run theirs: redis-py's blocking client in the thread pool, its asyncio client on the event
loop), so the comparison includes what waiting on Redis costs each kind of server.

Each server runs in its own process with a `grpc.health.v1` Check handler answering SERVING (a
function in the thread pool, a coroutine on the event loop); `--callers` threads in this
process send `--calls` checks over one channel, and the server process reports its own CPU
seconds (user + system, all threads) before and after. Servers alternate over `--repeats`
passes, so drifting machine load weighs on both; printed: each pass, the median per kind, and
the ratio asyncio / thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
import uuid
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

KINDS = ("threads", "asyncio")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=8000, help="health checks per pass")
    parser.add_argument("--callers", type=int, default=8, help="threads that send them")
    parser.add_argument("--workers", type=int, default=64, help="thread-pool server: worker threads (the cache's)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per server kind, alternating")
    parser.add_argument(
        "--redis-calls", type=int, default=0, help="Redis round trips (EVALSHA) each handler makes before answering"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis of --redis-calls")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def _answer_cpu(conn: Connection) -> None:
    while conn.recv() == "cpu":
        conn.send(time.process_time())


_SCRIPT = "return redis.call('INCR', KEYS[1])"


def _serving() -> Any:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _serve_threads(args: argparse.Namespace, key: str, conn: Connection) -> None:
    import grpc
    import redis
    from grpc_health.v1 import health_pb2_grpc

    client = redis.Redis.from_url(args.redis_url, max_connections=args.workers + 8)
    script = client.register_script(_SCRIPT)

    class Health(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            for _ in range(args.redis_calls):
                script(keys=[key])
            return _serving()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    _answer_cpu(conn)
    server.stop(0)
    client.close()


def _serve_asyncio(args: argparse.Namespace, key: str, conn: Connection) -> None:
    import grpc
    import redis.asyncio
    from grpc_health.v1 import health_pb2_grpc

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(args.redis_url)
        script = client.register_script(_SCRIPT)

        class Health(health_pb2_grpc.HealthServicer):
            async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
                for _ in range(args.redis_calls):
                    await script(keys=[key])
                return _serving()

        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        # the CPU questions are answered off the event loop, which keeps serving meanwhile
        await asyncio.get_running_loop().run_in_executor(None, _answer_cpu, conn)
        await server.stop(0)
        await client.aclose()

    asyncio.run(main())


def measure(kind: str, args: argparse.Namespace) -> tuple[float, int]:
    """(server CPU seconds per health check, Redis round trips its handlers made) for one pass of
    server `kind` (a fresh process; the round trips are counted by the script's counter)."""
    import grpc
    import redis

    from asyncopd.lab.bench.cache_load import grpc_floor_s

    target = {"threads": _serve_threads, "asyncio": _serve_asyncio}[kind]
    key = f"bench-grpc-floor-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=target, args=(args, key, child), daemon=True)
    server.start()
    try:
        port = parent.recv()

        def cpu() -> float:
            parent.send("cpu")
            return float(parent.recv())

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            per_rpc = grpc_floor_s(ch, cpu, args.calls, args.callers)
    finally:
        parent.send("stop")
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
        round_trips = 0
        if args.redis_calls:
            with redis.Redis.from_url(args.redis_url) as client:
                round_trips = int(client.get(key) or 0)
                client.delete(key)
    return per_rpc, round_trips


def run(args: argparse.Namespace) -> int:
    passes: dict[str, list[float]] = {k: [] for k in KINDS}
    round_trips: dict[str, list[int]] = {k: [] for k in KINDS}
    if args.redis_calls < 0:
        raise SystemExit(f"--redis-calls {args.redis_calls}: must be 0 or more")
    work = f", each handler making {args.redis_calls} Redis round trips" if args.redis_calls else ""
    print(
        f"grpc floor: {args.calls} health checks from {args.callers} callers per pass{work}, {args.repeats} passes each"
    )
    for i in range(args.repeats):
        for kind in KINDS:
            s, n = measure(kind, args)
            passes[kind].append(s)
            round_trips[kind].append(n)
            print(f"  pass {i + 1} {kind:8s} {1e6 * s:7.1f} us CPU per RPC ({1 / s:,.0f} RPC per CPU-second)")
    medians = {k: statistics.median(v) for k, v in passes.items()}
    ratio = medians["asyncio"] / medians["threads"]
    print(
        f"median: thread pool {1e6 * medians['threads']:.1f} us, asyncio {1e6 * medians['asyncio']:.1f} us "
        f"per RPC; asyncio / thread pool = {ratio:.2f} (below 1: the asyncio server is cheaper)"
    )
    if args.json:
        us = {k: [1e6 * s for s in v] for k, v in passes.items()}
        out = {"redis_calls": args.redis_calls, "redis_round_trips": round_trips, "us_per_rpc": us, "ratio": ratio}
        print(json.dumps(out))
    return 0
