"""TensorBoard event files through `torch.utils.tensorboard.SummaryWriter` (needs the
`tensorboard` package: the `tracking` extra). Offline, no account; `tensorboard --logdir DIR`
shows them. The step axis is the learner version the record ends at."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncopd.tracking.records import histograms_of, scalars_of


class TensorBoardTracker:
    """Writes each record's scalars (and the staleness histogram) at step = record version."""

    def __init__(self, logdir: str | Path, flush_every: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "tracking.backends [tensorboard] needs the tensorboard package: pip install 'asyncopd[tracking]'"
            ) from err
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.logdir))
        self._flush_every = flush_every
        self._pending = 0

    def log_record(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("version", 0))
        scalars = scalars_of(record)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        for name, values in histograms_of(record).items():
            import numpy as np

            self._writer.add_histogram(name, np.asarray(values), step)
        if scalars:
            self._pending += 1
        if self._pending >= self._flush_every:
            self._writer.flush()
            self._pending = 0

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
