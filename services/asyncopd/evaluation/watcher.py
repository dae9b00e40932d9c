"""The evaluator: a process of its own that evaluates every checkpoint the learner publishes,
off the training path.

It watches the learner's checkpoint directory (`learner.checkpoint_dir`: `LATEST` names the
newest complete `step-<version>` directory, each with `learner.json`), loads each new one
read-only, samples `n` responses per test prompt (`asyncopd.evaluation.sampled`) and appends one
`{"event": "eval", "version": ..., "avg@n": ..., "pass@k": ...}` line to its own JSONL file
(default `<output_dir>/eval_steps.jsonl`; the launcher's step-log reader and plots read the same
shape). It never talks to the learner and holds nothing the learner waits for, so it cannot
block training; when it falls behind it skips to the newest checkpoint. A checkpoint pruned
while it was being read is skipped (logged), not fatal.

It knows checkpoint files, the task and the sampled evaluation; nothing of services or gRPC.
Run: `python -m asyncopd.evaluation.watcher -c CONFIG [--n 4] [--k 1,4] [--once]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncopd.config import RunConfig

log = logging.getLogger(__name__)

EVAL_LOG_NAME = "eval_steps.jsonl"


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluator samples: n responses per prompt, pass@k for each k, how often it looks."""

    n: int = 4
    ks: tuple[int, ...] = (1, 4)
    poll_s: float = 2.0
    batch_size: int = 64
    device: str = "cpu"


def newest_checkpoint(directory: Path) -> tuple[int, Path] | None:
    """(version, path) of the checkpoint `LATEST` names, if it is complete; else None."""
    pointer = directory / "LATEST"
    try:
        path = directory / pointer.read_text().strip()
        version = int(json.loads((path / "learner.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None
    return version, path


class Evaluator:
    """Evaluate each new checkpoint of one run; `poll()` does one look, `run()` loops."""

    def __init__(self, config: RunConfig, settings: EvalSettings, out: Path | None = None) -> None:
        self.config = config
        self.settings = settings
        self.checkpoints = Path(config.learner.checkpoint_dir)
        self.out = out or Path(config.output_dir) / EVAL_LOG_NAME
        self.last_version: int | None = None
        self._items: list[Any] | None = None

    def items(self) -> list[Any]:
        if self._items is None:
            from asyncopd.models.chat import prompt_formatter
            from asyncopd.tasks import load_task

            chat = prompt_formatter(self.config.models.student, self.config.task)
            self._items = list(load_task(self.config.task, "test", chat))
        return self._items

    def poll(self) -> dict[str, Any] | None:
        """Evaluate the newest checkpoint if it is new; the record written, or None."""
        found = newest_checkpoint(self.checkpoints)
        if found is None or found[0] == self.last_version:
            return None
        version, path = found
        try:
            record = self.evaluate(version, path)
        except (OSError, ValueError) as exc:  # pruned or replaced while we read it
            log.warning("evaluator: skipping %s: %s", path.name, exc)
            return None
        self.last_version = version
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("evaluator: version %d: %s", version, record)
        return record

    def evaluate(self, version: int, path: Path) -> dict[str, Any]:
        from asyncopd.evaluation.sampled import evaluate_sampled
        from asyncopd.models.loading import load_model, load_tokenizer

        s, sampling = self.settings, self.config.rollout.sampling
        tokenizer = load_tokenizer(str(path))
        model = load_model(str(path), self.config.models.dtype, s.device)
        result = evaluate_sampled(
            model,
            tokenizer,
            self.items(),
            n=s.n,
            ks=s.ks,
            max_new_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            batch_size=s.batch_size,
            seed=self.config.seed + version,
        )
        return {"event": "eval", "version": version, "time_unix": time.time(), **result.summary()}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll()
            stop.wait(self.settings.poll_s)


def _ks(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(k) for k in text.split(",") if k.strip()}))


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    from asyncopd.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m asyncopd.evaluation.watcher",
        description="Evaluate every checkpoint the learner writes (Avg@n, pass@k), off the training path.",
    )
    parser.add_argument("-c", "--config", action="append", default=None, help="run config YAML (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n", type=int, default=4, help="responses sampled per prompt (default 4)")
    parser.add_argument("--k", default="1,4", help="comma-separated k of pass@k, each <= n (default 1,4)")
    parser.add_argument("--poll-s", type=float, default=2.0, help="seconds between looks at LATEST")
    parser.add_argument("--device", default="cpu", help="torch device of the evaluator (not the learner's)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSONL output (default <output_dir>/{EVAL_LOG_NAME})")
    parser.add_argument("--once", action="store_true", help="evaluate the newest checkpoint once and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    ks = _ks(args.k)
    if args.n < 1 or not ks or ks[0] < 1 or ks[-1] > args.n:
        parser.error(f"need n >= 1 and every k in 1..n (n={args.n}, k={args.k})")
    evaluator = Evaluator(config, EvalSettings(n=args.n, ks=ks, poll_s=args.poll_s, device=args.device), args.out)
    if args.once:
        return 0 if evaluator.poll() is not None else 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    evaluator.run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
