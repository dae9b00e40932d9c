"""Tracking: step records -> scalars and histograms, written to a TensorBoard event file and
read back with TensorBoard's own EventAccumulator; backends from the config; failures isolated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from asyncopd.config import load_config
from asyncopd.tracking import FanOut, NullTracker, histograms_of, open_tracker, scalars_of

pytestmark = pytest.mark.unit


def step_record(version: int, loss: float) -> dict[str, Any]:
    return {
        "event": "step",
        "version": version,
        "version_before": version - 1,
        "time_unix": 1.0e9,
        "samples": 4,
        "tokens": 40,
        "lr": 1e-4,
        "grad_norm": 0.5,
        "loss": loss,
        "kl": loss / 2,
        "ratio_mean": 1.01,
        "ratio_max": 1.3,
        "staleness_mean": 1.0,
        "staleness_max": 2,
        "staleness_hist": {"0": 1, "1": 2, "2": 1},
        "seconds": {"data_wait": 0.01, "compute": 0.2, "weight_sync": 0.03},
        "broadcast": None,
        "sample_ids": ["a", "b"],
    }


def test_scalars_and_histograms_of_a_step_record() -> None:
    scalars = scalars_of(step_record(3, 0.8))
    assert scalars["train/loss"] == 0.8 and scalars["train/kl"] == 0.4
    assert scalars["train/ratio_mean"] == 1.01 and scalars["train/ratio_max"] == 1.3
    assert scalars["staleness/mean"] == 1.0 and scalars["staleness/max"] == 2.0
    assert scalars["time/compute"] == 0.2 and scalars["time/weight_sync"] == 0.03
    assert not any(k.endswith(("version", "time_unix", "sample_ids", "hist")) for k in scalars)
    assert histograms_of(step_record(3, 0.8)) == {"staleness/samples": [0.0, 1.0, 1.0, 2.0]}
    assert scalars_of({"event": "eval", "version": 4, "accuracy": 0.5, "n": 8}) == {
        "eval/accuracy": 0.5,
        "eval/n": 8.0,
    }
    assert scalars_of({"event": "start", "version": 0}) == {}


def test_tensorboard_event_file_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, ["tracking.backends=[tensorboard]", f"tracking.directory={tmp_path / 'tb'}"])
    tracker = open_tracker(config.tracking, tmp_path)
    for version, loss in ((1, 0.9), (2, 0.7), (3, 0.5)):
        tracker.log_record(step_record(version, loss))
    tracker.log_record({"event": "eval", "version": 3, "accuracy": 0.25, "n": 4})
    tracker.close()
    (logdir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/kl", "staleness/mean", "time/compute", "eval/accuracy"} <= set(tags["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [0.9, 0.7, 0.5]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(3, 0.25)]
    (hist, *_) = events.Histograms("staleness/samples")
    assert hist.step == 1 and hist.histogram_value.num == 4 and hist.histogram_value.max == 2.0


def test_no_backends_is_a_null_tracker_and_a_failing_backend_is_dropped(tmp_path: Path) -> None:
    assert isinstance(open_tracker(load_config().tracking, tmp_path), NullTracker)

    class Broken:
        calls = 0

        def log_record(self, record: Any) -> None:
            Broken.calls += 1
            raise OSError("disk full")

        def close(self) -> None:
            pass

    class Keeps:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def log_record(self, record: Any) -> None:
            self.seen.append(record)

        def close(self) -> None:
            pass

    keeps = Keeps()
    fan = FanOut([Broken(), keeps])
    fan.log_record({"event": "step", "version": 1})
    fan.log_record({"event": "step", "version": 2})
    fan.close()
    assert Broken.calls == 1 and len(keeps.seen) == 2


def test_unknown_backend_is_a_config_error() -> None:
    from asyncopd.config import ConfigError

    with pytest.raises(ConfigError, match=r"tracking\.backends"):
        load_config(None, ["tracking.backends=[neptune]"])
