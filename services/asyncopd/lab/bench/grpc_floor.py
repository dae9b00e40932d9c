"""`asyncopd bench grpc-floor`: the CPU one gRPC Python server spends per RPC whose handler does
nothing, for the thread-pool server the services run (`grpc.server`) and for the asyncio one
(`grpc.aio.server`), side by side.

Why: a cache process's own work per RPC is measured against this floor (`bench cache-load`
prints both). If the asyncio server's floor were much lower, moving the services onto it would
raise what one process can serve; this measures whether it is. Each server runs in its own
process with a `grpc.health.v1` Check handler (the thread-pool one: grpc_health's servicer; the
asyncio one: a coroutine answering SERVING); `--callers` threads in this process send `--calls`
checks over one channel, and the server process reports its own CPU seconds (user + system, all
threads) before and after. Servers alternate over `--repeats` passes, so drifting machine load
weighs on both; printed: each pass, the median per kind, and the ratio asyncio / thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

KINDS = ("threads", "asyncio")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=8000, help="health checks per pass")
    parser.add_argument("--callers", type=int, default=8, help="threads that send them")
    parser.add_argument("--workers", type=int, default=64, help="thread-pool server: worker threads (the cache's)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per server kind, alternating")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def _answer_cpu(conn: Connection) -> None:
    while conn.recv() == "cpu":
        conn.send(time.process_time())


def _serve_threads(workers: int, conn: Connection) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    _answer_cpu(conn)
    server.stop(0)


def _serve_asyncio(workers: int, conn: Connection) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    class Health(health_pb2_grpc.HealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        # the CPU questions are answered off the event loop, which keeps serving meanwhile
        await asyncio.get_running_loop().run_in_executor(None, _answer_cpu, conn)
        await server.stop(0)

    asyncio.run(main())


def measure(kind: str, args: argparse.Namespace) -> float:
    """Server CPU seconds per health check for one pass of server `kind` (a fresh process)."""
    import grpc

    from asyncopd.lab.bench.cache_load import grpc_floor_s

    target = {"threads": _serve_threads, "asyncio": _serve_asyncio}[kind]
    parent, child = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(target=target, args=(args.workers, child), daemon=True)
    server.start()
    try:
        port = parent.recv()

        def cpu() -> float:
            parent.send("cpu")
            return float(parent.recv())

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return grpc_floor_s(ch, cpu, args.calls, args.callers)
    finally:
        parent.send("stop")
        server.join(timeout=30)
        if server.is_alive():
            server.kill()


def run(args: argparse.Namespace) -> int:
    passes: dict[str, list[float]] = {k: [] for k in KINDS}
    print(f"grpc floor: {args.calls} health checks from {args.callers} callers per pass, {args.repeats} passes each")
    for i in range(args.repeats):
        for kind in KINDS:
            s = measure(kind, args)
            passes[kind].append(s)
            print(f"  pass {i + 1} {kind:8s} {1e6 * s:7.1f} us CPU per RPC ({1 / s:,.0f} RPC per CPU-second)")
    medians = {k: statistics.median(v) for k, v in passes.items()}
    ratio = medians["asyncio"] / medians["threads"]
    print(
        f"median: thread pool {1e6 * medians['threads']:.1f} us, asyncio {1e6 * medians['asyncio']:.1f} us "
        f"per RPC; asyncio / thread pool = {ratio:.2f} (below 1: the asyncio server is cheaper)"
    )
    if args.json:
        print(json.dumps({"us_per_rpc": {k: [1e6 * s for s in v] for k, v in passes.items()}, "ratio": ratio}))
    return 0
