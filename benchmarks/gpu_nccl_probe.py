"""Probe: can two ranks form an NCCL group from a TCPStore (no init_process_group) on this machine?

Run on a CUDA machine: `python benchmarks/gpu_nccl_probe.py`. Two processes, rank r on
cuda:(r % device_count); broadcasts 256 MiB from rank 0 and prints the time, or the error NCCL
gives (one GPU: both ranks share a device, which NCCL refuses).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, port: int, queue: mp.Queue[str]) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("probe", store), rank, 2, opts)
        x = torch.full((64 << 20,), float(rank), device=device)
        pg.broadcast(x, 0).wait()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            pg.broadcast(x, 0).wait()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 5
        queue.put(
            json.dumps(
                {
                    "rank": rank,
                    "ok": bool(x[0].item() == 0.0),
                    "seconds": dt,
                    "GBps": round(x.numel() * 4 / dt / 1e9, 2),
                }
            )
        )
    except Exception as exc:  # report the failure to the parent; this is a probe
        queue.put(json.dumps({"rank": rank, "error": f"{type(exc).__name__}: {exc}"[:400]}))


def main() -> int:
    ctx = mp.get_context("spawn")
    queue: mp.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 29517, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        if p.is_alive():
            p.kill()
    while not queue.empty():
        print(queue.get())
    print(json.dumps({"gpus": torch.cuda.device_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
