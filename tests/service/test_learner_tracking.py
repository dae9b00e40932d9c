"""The learner loop feeds its step records to the configured tracker: a real run of the loop
on tiny models, read back from the TensorBoard event file it wrote."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from asyncopd.config.tracking import TrackingConfig
from asyncopd.learner.loop import LearnerLoop, LoopSettings
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss
from asyncopd.tracking import open_tracker
from asyncopd.wire.cache_client import Batch
from batch_source_stub import StubBatchSource
from test_learner_step import generate, load, scored_samples
from tiny_models import make_tiny_qwen3

pytestmark = pytest.mark.service


class StaleCache(StubBatchSource):
    """A BatchSource handing out the same samples with staleness 0, 1, 1, 2."""

    def __init__(self, samples: list[Any]) -> None:
        super().__init__()
        self.samples = samples

    def batch(self, n: int, size: int) -> Batch:
        return Batch(batch_id=f"b{n}", samples=self.samples[:size], staleness=[0, 1, 1, 2][:size])


def test_loop_step_records_reach_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    student = make_tiny_qwen3(tmp_path / "student", seed=1)
    teacher = make_tiny_qwen3(tmp_path / "teacher", seed=2, scale=4.0)
    samples = scored_samples(generate(load(student), load(teacher), n=4), "reverse_kl_mc")
    trainer = Trainer(load(student), OPDLoss("reverse_kl_mc", correction="is"), lr=1e-3, micro_batch_size=4)
    tracker = open_tracker(TrackingConfig(backends=["tensorboard"]), tmp_path / "out")
    log = tmp_path / "steps.jsonl"
    settings = LoopSettings(steps=3, batch_size=4)
    LearnerLoop(
        trainer, StaleCache(samples), None, settings, stop=threading.Event(), step_log=log, tracker=tracker
    ).run()

    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "step"]
    assert [r["version"] for r in steps] == [1, 2, 3]
    assert steps[0]["staleness_hist"] == {"0": 1, "1": 2, "2": 1}
    (logdir,) = {p.parent for p in (tmp_path / "out" / "tracking").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert {"train/ratio_mean", "staleness/mean", "time/compute"} <= set(events.Tags()["scalars"])
    assert [h.histogram_value.num for h in events.Histograms("staleness/samples")] == [4, 4, 4]
