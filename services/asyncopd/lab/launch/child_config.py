"""What every child of a local run is given: its loopback ports, the one resolved config file
it reads, and its environment.

The ports are chosen up front (so the resolved config can name every endpoint before anything
starts); the config file has endpoints, ports and paths filled in and never a password (that
travels in the environment, as does the run's weight-sync store key: one random key per run,
unless the launcher's own environment sets one). It knows the run config's layout; nothing about processes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncopd.config import RunConfig
from asyncopd.config.loader import REDIS_PASSWORD_ENV
from asyncopd.config.weightsync import WEIGHTSYNC_KEY_ENV
from asyncopd.lab.launch.ports import free_port

STEP_LOG_NAME = "learner_steps.jsonl"
RESOLVED_CONFIG_NAME = "config.yaml"


@dataclass
class Ports:
    """Loopback ports of every server the run starts, chosen up front."""

    cache: int
    learner: int
    teachers: list[int]
    rollouts: list[int]
    metrics: dict[str, int] = field(default_factory=dict)


def pick_ports(config: RunConfig) -> Ports:
    names = (
        ["cache", "learner"]
        + [f"teacher-{i}" for i in range(config.teacher.replicas)]
        + [f"rollout-{i}" for i in range(config.rollout.replicas)]
    )
    # Picked one at a time with the sockets closed in between, so avoid duplicates by hand.
    taken: set[int] = set()

    def pick() -> int:
        while True:
            port = free_port()
            if port not in taken:
                taken.add(port)
                return port

    metrics = {name: pick() for name in names}
    return Ports(
        cache=pick(),
        learner=pick(),
        teachers=[pick() for _ in range(config.teacher.replicas)],
        rollouts=[pick() for _ in range(config.rollout.replicas)],
        metrics=metrics,
    )


def resolved_config_data(
    config: RunConfig, out_dir: Path, redis_url: str, key_prefix: str, ports: Ports
) -> dict[str, Any]:
    """The config every child reads: endpoints and ports filled in, paths absolute, no password."""
    data = config.model_dump(mode="json")
    data["redis"]["password"] = None
    data["redis"]["url"] = redis_url
    data["redis"]["key_prefix"] = key_prefix
    data["output_dir"] = str(out_dir)
    data["endpoints"]["cache"] = f"127.0.0.1:{ports.cache}"
    data["endpoints"]["learner"] = f"127.0.0.1:{ports.learner}"
    data["cache"]["server"]["port"] = ports.cache
    data["cache"]["server"]["metrics_port"] = ports.metrics["cache"]
    data["learner"]["server"]["port"] = ports.learner
    data["learner"]["server"]["metrics_port"] = ports.metrics["learner"]
    data["learner"]["checkpoint_dir"] = str(out_dir / "checkpoints")
    if "step_log" in data["learner"]:
        data["learner"]["step_log"] = str(out_dir / STEP_LOG_NAME)
    for section in ("cache", "learner", "teacher", "rollout"):
        data[section]["server"]["host"] = "127.0.0.1"
    return data


def child_env(config: RunConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: `base` (default: ours) with the run's settings applied."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    # Several torch processes share the machine; without a cap each would spawn one thread
    # per core and they would thrash each other on a small box.
    workers = config.rollout.replicas + config.teacher.replicas + 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env.pop(REDIS_PASSWORD_ENV, None)
    if config.redis.password is not None:
        env[REDIS_PASSWORD_ENV] = config.redis.password.get_secret_value()
    # The learner signs its weight-sync store values with it and the rollouts verify them
    # (asyncopd.weightsync.groups): a local run is signed too.
    if not env.get(WEIGHTSYNC_KEY_ENV):
        env[WEIGHTSYNC_KEY_ENV] = secrets.token_urlsafe(32)
    return env
