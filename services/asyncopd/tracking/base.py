"""The Tracker interface, a fan-out over several backends, and `open_tracker` from the config."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from asyncopd.config.tracking import TrackingConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Receives every step-log record (`event` step, eval, start) in order."""

    def log_record(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Tracks nothing (no backends configured)."""

    def log_record(self, record: Mapping[str, Any]) -> None:
        del record

    def close(self) -> None:
        pass


class FanOut:
    """Sends each record to every backend; a backend that raises is logged and dropped, so a
    full disk or a bad event file never stops training."""

    def __init__(self, backends: Sequence[Tracker]) -> None:
        self.backends = list(backends)

    def log_record(self, record: Mapping[str, Any]) -> None:
        for backend in list(self.backends):
            try:
                backend.log_record(record)
            except Exception:
                log.exception("tracking backend %s failed; dropping it", type(backend).__name__)
                self.backends.remove(backend)

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception:
                log.exception("tracking backend %s failed to close", type(backend).__name__)


def open_tracker(config: TrackingConfig, output_dir: str | Path, run_name: str = "run") -> Tracker:
    """The backends `config` lists, writing under `config.directory` (default
    `<output_dir>/tracking`); a `NullTracker` when none."""
    if not config.backends:
        return NullTracker()
    directory = Path(config.directory) if config.directory else Path(output_dir) / "tracking"
    backends: list[Tracker] = []
    for name in config.backends:
        if name == "tensorboard":
            from asyncopd.tracking.tensorboard import TensorBoardTracker

            backends.append(TensorBoardTracker(directory / "tensorboard", flush_every=config.flush_every))
        else:  # pragma: no cover - the config's Literal admits only the names above
            raise ValueError(f"tracking.backends: unknown backend {name!r}")
    log.info("tracking run %s with %s under %s", run_name, ", ".join(config.backends), directory)
    return FanOut(backends)
