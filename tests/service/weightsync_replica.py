"""A stand-alone weight-sync replica for the multi-process tests: subscribe, and log each update.

`python weightsync_replica.py LEARNER_ADDRESS NAME LOG_PATH TIMEOUT_S [HEARTBEAT_S]` runs `run_subscriber`
until SIGTERM and appends one JSON line per applied update: version and a digest of every
tensor's bytes (so the test can compare bit-for-bit with what the learner published).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from collections.abc import Iterable

import torch
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync.subscriber import run_subscriber


def digest(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return {
        name: f"{t.dtype}:{tuple(t.shape)}:"
        + hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in named
    }


def main() -> None:
    address, name, log_path, timeout_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    heartbeat_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"version": version, "digest": digest(named)}) + "\n")

    config = WeightSyncConfig(
        timeout_s=timeout_s,
        bucket_mb=0.05,
        checksum=True,
        heartbeat_s=heartbeat_s,
        dead_after_s=max(5.0, 2 * heartbeat_s),
    )
    run_subscriber(address, name, apply, stop, config)


if __name__ == "__main__":
    main()
