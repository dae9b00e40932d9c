"""`asyncopd bench weightsync`: bucketed, versioned weight broadcast vs a raw `pg.broadcast`.

For each replica count R it spawns R subscriber processes on loopback. Each first joins a
plain gloo group and receives one flat uint8 tensor of the model's byte size `repeats` times
(the raw baseline: the fastest a single collective can move those bytes), then subscribes to
the collective weight transport (LearnerService registration, membership epoch, manifest +
buckets + acks).
It prints, per R: raw GB/s, weightsync transfer GB/s (broadcast + acks), end-to-end GB/s
(including packing the snapshot), the ratio weightsync/raw, and how long the group took to form.

It measures; it knows nothing of models beyond a list of named tensors of the chosen sizes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, Progress, add_to_server
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.groups import broadcast, connect_store, host_store
from asyncopd.weightsync.subscriber import run_subscriber
from asyncopd.wire.rpc import start_server

_MIB = 1 << 20


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-mb", type=float, default=64.0, help="total bytes of the fake model, MiB")
    parser.add_argument("--tensors", type=int, default=64, help="number of parameters it is split into")
    parser.add_argument("--bucket-mb", type=float, default=16.0, help="weightsync bucket size, MiB")
    parser.add_argument("--replicas", default="1,2,4", help="comma-separated replica counts")
    parser.add_argument("--repeats", type=int, default=3, help="timed broadcasts per measurement (median)")
    parser.add_argument("--checksum", action="store_true", help="also compute and verify checksums")
    parser.add_argument("--json", action="store_true", help="print one JSON line per replica count")


def _fake_model(total_bytes: int, tensors: int) -> list[tuple[str, torch.Tensor]]:
    per = max(1, total_bytes // (4 * tensors))
    return [(f"layers.{i}.weight", torch.randn(per)) for i in range(tensors)]


def _replica(spec: dict[str, Any]) -> None:
    rank, learner = int(spec["rank"]), str(spec["learner"])
    store = connect_store("127.0.0.1", int(spec["raw_port"]), 60.0)
    pg = dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, int(spec["world"]), timedelta(seconds=60))
    buf = torch.empty(int(spec["nbytes"]), dtype=torch.uint8)
    for _ in range(int(spec["repeats"]) + 1):
        broadcast(pg, buf, 60.0)
    del pg
    stop = threading.Event()
    seen: list[int] = []

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen.append(version)

    def watch() -> None:  # leave when the learner writes the stop key
        store.wait(["stop"], timedelta(days=1))
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    run_subscriber(learner, f"bench-{rank}", apply, stop, WeightSyncConfig.model_validate_json(spec["config"]))


def _measure(replicas: int, named: list[tuple[str, torch.Tensor]], args: argparse.Namespace) -> dict[str, float]:
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    cfg = WeightSyncConfig(bucket_mb=args.bucket_mb, timeout_s=60.0, checksum=args.checksum)
    transport = CollectiveBroadcast(cfg)
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(transport, Progress))], [SERVICE_NAME])
    raw_store = host_store("127.0.0.1", 0, 60.0)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_replica,
            args=(
                {
                    "raw_port": raw_store.port,
                    "rank": r,
                    "world": replicas + 1,
                    "nbytes": nbytes,
                    "repeats": args.repeats,
                    "learner": server.address,
                    "config": cfg.model_dump_json(),
                },
            ),
            daemon=True,
        )
        for r in range(1, replicas + 1)
    ]
    try:
        for p in procs:
            p.start()
        pg = dist.ProcessGroupGloo(dist.PrefixStore("raw", raw_store), 0, replicas + 1, timedelta(seconds=120))
        flat = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        broadcast(pg, flat, 120.0)  # warm-up (connections, buffers)
        raw = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            broadcast(pg, flat, 120.0)
            raw.append(time.perf_counter() - start)
        del pg
        start = time.perf_counter()
        transport.publish(1, named)  # forms the group (R registrations) and delivers version 1
        deadline = time.monotonic() + 120
        while len(transport.replicas) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(transport.replicas)} of {replicas} replicas joined")
            time.sleep(0.01)
        transport.sync()
        formed = time.perf_counter() - start
        sync, total = [], []
        for version in range(2, args.repeats + 2):
            report = transport.publish(version, named)
            if report.rebuilds:
                raise RuntimeError("the group was rebuilt during the measurement")
            sync.append(report.sync_seconds)
            total.append(report.pack_seconds + report.sync_seconds)
        raw_s, sync_s, total_s = statistics.median(raw), statistics.median(sync), statistics.median(total)
        gb = nbytes / 1e9
        return {
            "replicas": replicas,
            "bytes": nbytes,
            "raw_s": raw_s,
            "raw_gbps": gb / raw_s,
            "weightsync_s": sync_s,
            "weightsync_gbps": gb / sync_s,
            "end_to_end_gbps": gb / total_s,
            "ratio": raw_s / sync_s,
            "ratio_end_to_end": raw_s / total_s,
            "group_formed_s": formed,
        }
    finally:
        raw_store.set("stop", "1")
        transport.close()
        server.stop(0)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def run(args: argparse.Namespace) -> int:
    named = _fake_model(int(args.model_mb * _MIB), args.tensors)
    counts = [int(x) for x in str(args.replicas).split(",") if x]
    if not args.json:
        print(
            f"weight sync, gloo on loopback: {args.model_mb:.0f} MiB in {args.tensors} tensors, "
            f"bucket {args.bucket_mb:g} MiB, median of {args.repeats}, checksum={args.checksum}"
        )
        print(f"{'R':>3} {'raw GB/s':>9} {'ws GB/s':>8} {'ws+pack':>8} {'ratio':>6} {'w/pack':>7} {'join s':>7}")
    for replicas in counts:
        m = _measure(replicas, named, args)
        if args.json:
            print(json.dumps(m))
        else:
            print(
                f"{replicas:>3} {m['raw_gbps']:>9.2f} {m['weightsync_gbps']:>8.2f} {m['end_to_end_gbps']:>8.2f} "
                f"{m['ratio']:>6.2f} {m['ratio_end_to_end']:>7.2f} {m['group_formed_s']:>7.2f}"
            )
    return 0
