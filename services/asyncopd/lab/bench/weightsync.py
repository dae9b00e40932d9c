"""`asyncopd bench weightsync`: bucketed, versioned weight broadcast vs a raw `pg.broadcast`.

For each replica count R it spawns R replica processes on loopback. Each joins a plain gloo
group for the raw baseline (one flat uint8 tensor of the model's byte size, received into one
buffer: the fastest a single collective can move those bytes) and subscribes to the collective
weight transport (LearnerService registration, membership epoch, manifest + buckets + acks),
whose `apply` copies every tensor into a preallocated model (`--load copy`, a real load; the
stream overlaps it with the next bucket's transfer) or ignores it (`--load none`). The learner
alternates raw broadcasts and publishes, so both see the same load on a shared machine.
It prints, per R: raw GB/s, weightsync transfer GB/s (broadcast + loads + acks), end-to-end
GB/s (including packing the snapshot), the ratio weightsync/raw, how long the group took to
form, and the replicas' largest peak memory beyond their model while subscribed (VmHWM over
VmRSS before subscribing: the receive buffers, threads and connections). `--pipeline on` packs
bucket k + 1 while bucket k is broadcast (the default for GPU buckets): the transfer then
includes the packing it overlaps, and end to end is the figure to compare.

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
    parser.add_argument(
        "--load",
        choices=("copy", "none"),
        default="copy",
        help="what a replica's apply does: copy every tensor into its model (a real load) or nothing",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per replica count")
    parser.add_argument(
        "--pipeline",
        choices=("auto", "on", "off"),
        default="auto",
        help="pack bucket k + 1 while bucket k is broadcast: auto = the transport's default (on for GPU "
        "buckets, off on CPU); with it on, 'ws' includes the packing it overlaps",
    )
    parser.add_argument(
        "--delta",
        action="store_true",
        help="compare dense and delta sync (weightsync.delta) side by side on real AdamW updates "
        "(asyncopd.lab.bench.weightsync_delta) instead of sync vs raw broadcast",
    )
    parser.add_argument("--lr", type=float, default=1e-6, help="--delta: AdamW learning rate of the updates")
    parser.add_argument("--delta-steps", type=int, default=4, help="--delta: AdamW steps on the toy model")


def _fake_model(total_bytes: int, tensors: int) -> list[tuple[str, torch.Tensor]]:
    per = max(1, total_bytes // (4 * tensors))
    return [(f"layers.{i}.weight", torch.randn(per)) for i in range(tensors)]


def _rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _replica(spec: dict[str, Any]) -> None:
    rank, learner = int(spec["rank"]), str(spec["learner"])
    store = connect_store("127.0.0.1", int(spec["raw_port"]), 60.0)
    pg = dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, int(spec["world"]), timedelta(seconds=60))
    buf = torch.empty(int(spec["nbytes"]), dtype=torch.uint8)
    broadcast(pg, buf, 60.0)  # warm-up; the buffer is resident from here on
    # The engine's model: what `apply` loads into (allocated before the memory baseline).
    model = {name: torch.zeros(shape) for name, shape in spec["shapes"]} if spec["load"] == "copy" else {}
    stop = threading.Event()
    seen: list[int] = []

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:  # a load: copy every tensor out of the receive buffers
            if model:
                model[name].copy_(tensor)
        seen.append(version)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    baseline = _rss_kib("VmRSS")
    config = WeightSyncConfig.model_validate_json(spec["config"])
    subscriber = threading.Thread(target=run_subscriber, args=(learner, f"bench-{rank}", apply, stop, config))
    subscriber.start()
    for _ in range(int(spec["repeats"])):  # raw broadcasts, interleaved with the learner's publishes
        broadcast(pg, buf, 60.0)
    store.wait(["stop"], timedelta(days=1))
    stop.set()
    subscriber.join(timeout=60)
    extra = (_rss_kib("VmHWM") - baseline) * 1024
    store.set(f"mem/{rank}", json.dumps({"extra_bytes": extra, "versions": seen}))


def _measure(replicas: int, named: list[tuple[str, torch.Tensor]], args: argparse.Namespace) -> dict[str, float]:
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    cfg = WeightSyncConfig(bucket_mb=args.bucket_mb, timeout_s=60.0, checksum=args.checksum)
    transport = CollectiveBroadcast(cfg)
    if args.pipeline != "auto":
        transport.pipeline = args.pipeline == "on"
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(transport, Progress))], [SERVICE_NAME])
    raw_store = host_store("127.0.0.1", 0, 60.0)
    ctx = mp.get_context("spawn")
    spec = {
        "raw_port": raw_store.port,
        "world": replicas + 1,
        "nbytes": nbytes,
        "repeats": args.repeats,
        "learner": server.address,
        "config": cfg.model_dump_json(),
        "load": args.load,
        "shapes": [(name, list(t.shape)) for name, t in named],
    }
    procs = [ctx.Process(target=_replica, args=({**spec, "rank": r},), daemon=True) for r in range(1, replicas + 1)]
    stopped = False
    try:
        for p in procs:
            p.start()
        pg = dist.ProcessGroupGloo(dist.PrefixStore("raw", raw_store), 0, replicas + 1, timedelta(seconds=120))
        flat = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        broadcast(pg, flat, 120.0)  # warm-up (connections, buffers)
        start = time.perf_counter()
        transport.publish(1, named)  # forms the group (R registrations) and delivers version 1
        deadline = time.monotonic() + 120
        while len(transport.replicas) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(transport.replicas)} of {replicas} replicas joined")
            time.sleep(0.01)
        transport.sync()
        formed = time.perf_counter() - start
        raw, sync, total = [], [], []
        # Raw and weight-sync transfers alternate, so both see the same load on a shared machine.
        for version in range(2, args.repeats + 2):
            start = time.perf_counter()
            broadcast(pg, flat, 120.0)
            raw.append(time.perf_counter() - start)
            report = transport.publish(version, named)
            if report.rebuilds:
                raise RuntimeError("the group was rebuilt during the measurement")
            sync.append(report.sync_seconds)
            total.append(report.seconds)  # packing and sending overlap: their sum would count it twice
        raw_store.set("stop", "1")
        stopped = True
        mem = [json.loads(raw_store.get(f"mem/{r}")) for r in range(1, replicas + 1)]
        if any(m["versions"][-1] != args.repeats + 1 for m in mem):
            raise RuntimeError(f"a replica missed the last version: {[m['versions'] for m in mem]}")
        raw_s, sync_s, total_s = statistics.median(raw), statistics.median(sync), statistics.median(total)
        gb = nbytes / 1e9
        return {
            "replicas": replicas,
            "bytes": nbytes,
            "bucket_bytes": int(args.bucket_mb * _MIB),
            "raw_s": raw_s,
            "raw_gbps": gb / raw_s,
            "weightsync_s": sync_s,
            "weightsync_gbps": gb / sync_s,
            "end_to_end_gbps": gb / total_s,
            "ratio": raw_s / sync_s,
            # Each publish against the raw broadcast just before it: steadier than the ratio of
            # the medians when the machine's load drifts during the run.
            "ratio_paired": statistics.median(r / w for r, w in zip(raw, sync, strict=True)),
            "ratio_end_to_end": raw_s / total_s,
            "group_formed_s": formed,
            "receiver_extra_bytes": max(m["extra_bytes"] for m in mem),
        }
    finally:
        if not stopped:
            raw_store.set("stop", "1")
        transport.close()
        server.stop(0)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def run(args: argparse.Namespace) -> int:
    if args.delta:
        from asyncopd.lab.bench import weightsync_delta

        return weightsync_delta.run(args)
    named = _fake_model(int(args.model_mb * _MIB), args.tensors)
    counts = [int(x) for x in str(args.replicas).split(",") if x]
    if not args.json:
        print(
            f"weight sync, gloo on loopback: {args.model_mb:.0f} MiB in {args.tensors} tensors, "
            f"bucket {args.bucket_mb:g} MiB, median of {args.repeats}, checksum={args.checksum}, load={args.load}, "
            f"pipeline={args.pipeline}"
        )
        print(
            f"{'R':>3} {'raw GB/s':>9} {'ws GB/s':>8} {'ws+pack':>8} {'ratio':>6} {'paired':>6} {'w/pack':>7} "
            f"{'join s':>7} {'rx extra MiB':>12}"
        )
    for replicas in counts:
        m = _measure(replicas, named, args)
        if args.json:
            print(json.dumps(m))
        else:
            print(
                f"{replicas:>3} {m['raw_gbps']:>9.2f} {m['weightsync_gbps']:>8.2f} {m['end_to_end_gbps']:>8.2f} "
                f"{m['ratio']:>6.2f} {m['ratio_paired']:>6.2f} {m['ratio_end_to_end']:>7.2f} "
                f"{m['group_formed_s']:>7.2f} {m['receiver_extra_bytes'] / _MIB:>12.1f}"
            )
    return 0
