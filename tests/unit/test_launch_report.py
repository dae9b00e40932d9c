"""The run report, step-log reading, plots and the resolved config of `asyncopd run`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from asyncopd.config import config_from_dict
from asyncopd.lab.launch.accuracy import final_student_dir
from asyncopd.lab.launch.child_config import Ports, resolved_config_data
from asyncopd.lab.launch.plots import throughput_series, wall_times, write_plots
from asyncopd.lab.launch.progress import Snapshot, progress_table
from asyncopd.lab.launch.report import build_report, check_invariants, estimator_label, report_table, write_report
from asyncopd.lab.launch.steplog import StepLogReader, StepRecord, read_step_log, record_from_dict
from rich.console import Console

pytestmark = pytest.mark.unit

SECRET = "hunter2-very-secret"


def _stats(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "learner_version": 10,
        "admitted": 400,
        "produced": 380,
        "trained": 320,
        "dropped": {"evicted_stale": 12, "budget": 8},
        "in_flight": 40,
        "queue_depth": {"unscored": 5, "scored": 35},
        "staleness_served": {0: 100, 1: 150, 2: 70},
        "max_staleness": 2,
    }
    base.update(over)
    return base


def _steps(n: int = 10, t0: float = 1000.0) -> list[StepRecord]:
    return [
        StepRecord(
            version=v,
            time=t0 + 2.0 * v,
            loss=1.0 / v,
            kl=0.5 / v,
            samples=32,
            tokens=320,
            staleness_mean=1.0,
            staleness_max=2,
            accuracy=0.1 * v if v % 5 == 0 else None,
        )
        for v in range(1, n + 1)
    ]


def test_report_has_every_field_and_invariants_hold() -> None:
    config = config_from_dict({"max_staleness": 2, "loss": {"kind": "forward_kl_topk", "k": 4}})
    report = build_report(
        config,
        _stats(),
        _steps(),
        wall_seconds=20.0,
        accuracy_before=0.2,
        accuracy_after=0.6,
        accuracy_teacher=0.9,
    )
    for key in (
        "mode",
        "max_staleness",
        "estimator",
        "steps",
        "samples_trained",
        "tokens_trained",
        "wall_seconds",
        "train_tokens_per_second",
        "accuracy_before",
        "accuracy_after",
        "staleness_histogram",
        "produced",
        "trained",
        "dropped",
        "in_flight",
    ):
        assert key in report, key
    assert report["mode"] == "async"
    assert report["estimator"] == "forward_kl_topk(K=4, tail=bucket)"
    assert report["steps"] == 10
    assert report["samples_trained"] == 320
    assert report["tokens_trained"] == 3200
    assert report["train_tokens_per_second"] == pytest.approx(160.0)
    assert report["staleness_histogram"] == {"0": 100, "1": 150, "2": 70}
    assert report["max_staleness_served"] == 2
    assert report["dropped_total"] == 20
    assert report["teacher_gap_closed"] == pytest.approx((0.6 - 0.2) / (0.9 - 0.2), abs=1e-4)
    assert report["kl_first"] == pytest.approx(0.5) and report["kl_last"] == pytest.approx(0.05)
    assert report["invariant_violations"] == []
    json.dumps(report)  # JSON-ready


def test_sync_mode_and_violations_are_reported() -> None:
    config = config_from_dict({"max_staleness": 0})
    report = build_report(
        config,
        _stats(staleness_served={0: 10, 3: 1}, in_flight=41),
        [],
        wall_seconds=1.0,
        accuracy_before=None,
        accuracy_after=None,
    )
    assert report["mode"] == "sync"
    assert report["tokens_trained"] is None and report["train_tokens_per_second"] is None
    problems = report["invariant_violations"]
    assert len(problems) == 2
    assert "produced (380) != trained (320) + dropped (20) + in_flight (41)" in problems[0]
    assert "staleness 3" in problems[1] and "bound is 0" in problems[1]
    assert check_invariants({**report, "in_flight": 40, "staleness_histogram": {}, "max_staleness_served": 0}) == []


def test_estimator_labels() -> None:
    assert estimator_label(config_from_dict({})) == "reverse_kl_mc(N=8, recompute, is)"
    assert estimator_label(config_from_dict({"loss": {"kind": "reverse_kl_full"}})) == "reverse_kl_full"


def test_report_never_contains_the_redis_password(tmp_path: Path) -> None:
    config = config_from_dict({"redis": {"password": SECRET}})
    report = build_report(config, _stats(), _steps(), wall_seconds=5.0, accuracy_before=0.1, accuracy_after=0.2)
    path = write_report(report, tmp_path / "r" / "report.json")
    assert SECRET not in path.read_text()
    assert json.loads(path.read_text())["produced"] == 380
    report_table(report)  # renders without error


def test_resolved_config_has_ports_and_no_password(tmp_path: Path) -> None:
    config = config_from_dict({"redis": {"password": SECRET}, "teacher": {"replicas": 2}})
    ports = Ports(cache=1111, learner=2222, teachers=[3, 4], rollouts=[5], metrics={"cache": 6, "learner": 7})
    data = resolved_config_data(config, tmp_path, "redis://127.0.0.1:7777/0", "asyncopd:run1", ports)
    text = yaml.safe_dump(data)
    assert SECRET not in text
    loaded = config_from_dict(yaml.safe_load(text))
    assert loaded.redis.password is None
    assert loaded.redis.url == "redis://127.0.0.1:7777/0"
    assert loaded.redis.key_prefix == "asyncopd:run1"
    assert loaded.endpoints.cache == "127.0.0.1:1111"
    assert loaded.endpoints.learner == "127.0.0.1:2222"
    assert loaded.cache.server.port == 1111 and loaded.learner.server.port == 2222
    assert loaded.cache.server.metrics_port == 6 and loaded.learner.server.metrics_port == 7
    assert loaded.learner.checkpoint_dir == str(tmp_path / "checkpoints")
    assert loaded.output_dir == str(tmp_path)


def test_step_log_reader_is_incremental_and_skips_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    reader = StepLogReader(path)
    assert reader.poll() == []  # no file yet
    with path.open("w") as fh:
        fh.write(json.dumps({"version": 1, "loss": 0.5, "tokens": 100, "staleness": [0, 1, 2]}) + "\n")
        fh.write('{"version": 2, "loss"')  # mid-write
    first = reader.poll()
    assert [r.version for r in first] == [1]
    assert first[0].staleness_mean == pytest.approx(1.0) and first[0].staleness_max == 2
    with path.open("a") as fh:
        fh.write(': 0.25, "train_tokens": 50}\n')
        fh.write("not json\n")
        fh.write(json.dumps({"step": 2, "eval": {"accuracy": 0.4}}) + "\n")
    second = reader.poll()
    assert [(r.version, r.loss, r.tokens, r.accuracy) for r in second] == [(2, 0.25, 50, None), (2, None, None, 0.4)]
    assert second[0].is_step and not second[1].is_step
    assert len(read_step_log(path)) == 3


def test_the_learner_step_and_eval_lines_are_read() -> None:
    step = record_from_dict(
        {
            "event": "step",
            "version": 7,
            "version_before": 6,
            "time_unix": 1700000000.5,
            "samples": 32,
            "tokens": 640,
            "loss": 0.3,
            "kl": 0.2,
            "staleness_mean": 0.5,
            "staleness_max": 1,
            "seconds": {"data_wait": 0.1, "compute": 0.5, "weight_sync": 0.01},
        }
    )
    assert step is not None and step.is_step
    assert (step.version, step.time, step.tokens, step.kl, step.staleness_max) == (7, 1700000000.5, 640, 0.2, 1)
    evaluation = record_from_dict({"event": "eval", "version": 25, "accuracy": 0.42, "n": 200})
    assert evaluation is not None and not evaluation.is_step and evaluation.accuracy == 0.42


def test_record_key_variants() -> None:
    rec = record_from_dict({"step": 3, "kl_estimate": 0.1, "batch_size": 8, "mean_staleness": 0.5, "wall_s": 9.0})
    assert rec is not None
    assert (rec.version, rec.kl, rec.samples, rec.staleness_mean, rec.elapsed_s) == (3, 0.1, 8, 0.5, 9.0)
    assert record_from_dict({"loss": 1.0}) is None
    assert record_from_dict({"version": 1, "loss": float("nan")}).loss is None  # type: ignore[union-attr]


def test_moving_average_is_a_trailing_mean() -> None:
    from asyncopd.lab.launch.plots import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([], 3) == []


def test_wall_times_and_throughput() -> None:
    steps = _steps(4, t0=100.0)
    assert wall_times(steps, t0=100.0) == [2.0, 4.0, 6.0, 8.0]
    evaluation = StepRecord(version=2, accuracy=0.5)  # no clock: takes the step's before it
    assert wall_times([steps[0], steps[1], evaluation], t0=100.0) == [2.0, 4.0, 4.0]
    assert wall_times([evaluation, steps[0]], t0=100.0) == [None, 2.0]
    xs, ys = throughput_series(steps, t0=100.0)
    # the first step has no previous timestamp; each later one trained 320 tokens in 2 s
    assert xs == [2, 3, 4] and ys == [160.0, 160.0, 160.0]


def test_plots_are_written_from_a_synthetic_step_log(tmp_path: Path) -> None:
    paths = write_plots(
        _steps(),
        tmp_path / "plots",
        staleness_histogram={0: 3, 1: 5},
        t0=1000.0,
        accuracy_points=[(0, 0.0, 0.05)],
    )
    assert sorted(p.name for p in paths) == ["accuracy.png", "kl.png", "staleness.png", "throughput.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_final_student_dir_picks_the_newest_model_dir(tmp_path: Path) -> None:
    assert final_student_dir(tmp_path / "none") is None
    old = tmp_path / "step-1"
    new = tmp_path / "step-2" / "model"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    os.utime(old / "config.json", (1, 1))
    os.utime(new / "config.json", None)
    assert final_student_dir(tmp_path) == new
    (tmp_path / "LATEST").write_text("step-1\n")  # the learner's own pointer wins
    assert final_student_dir(tmp_path) == old


def test_bench_pipeline_comparison_and_ideal_ratio() -> None:
    from asyncopd.lab.bench.pipeline import compare, comparison_table, ideal_ratio

    # rollout 6 s, teacher 2 s, learner 2 s: perfect overlap is (6+2+2)/6 faster than serial
    stages = {
        "rollout": 6.0,
        "teacher": 2.0,
        "learner_compute": 1.5,
        "learner_weight_sync": 0.5,
        "learner_data_wait": 9,
    }
    assert ideal_ratio(stages) == pytest.approx(10.0 / 6.0)
    assert ideal_ratio({}) is None
    base = {"steps": 5, "wall_seconds": 10.0, "invariant_violations": []}
    sync = {**base, "mode": "sync", "max_staleness": 0, "train_tokens_per_second": 100.0, "stage_seconds": stages}
    fast = {**base, "mode": "async", "max_staleness": 5, "train_tokens_per_second": 150.0}
    result = compare([sync, fast])
    assert result["ideal_ratio"] == pytest.approx(1.667, abs=1e-3)
    assert [r["ratio_to_sync"] for r in result["rows"]] == [1.0, 1.5]
    assert result["rows"][1]["fraction_of_ideal"] == pytest.approx(0.9, abs=1e-3)
    comparison_table(result)
    with pytest.raises(ValueError, match="strict synchronous"):
        compare([fast, sync])


def test_progress_table_shows_the_pipeline_state() -> None:
    snap = Snapshot(
        elapsed_s=42.0,
        steps_total=400,
        version=100,
        cache=_stats(),
        last_step=_steps(1)[0],
        last_accuracy=0.745,
        rollout_tokens_per_s=1436.8,
        train_tokens_per_s=1363.6,
    )
    console = Console(record=True, width=120)
    console.print(progress_table(snap))
    text = console.export_text()
    for expected in ("100/400 (25%)", "mean 1.00, max 2", "1436.8", "1363.6", "unscored 5", "dropped 20", "0.745"):
        assert expected in text, expected


def _zigzag_steps(n: int = 120) -> list[StepRecord]:
    """Batches alternating between mostly-1 and mostly-2 staleness (as an async run's log reads),
    then, after version 60, half 0 and half 1."""
    return [
        StepRecord(
            version=v,
            time=1000.0 + v,
            loss=1.0,
            tokens=100,
            staleness_hist=({1: 6, 2: 2} if v % 2 else {1: 2, 2: 6}) if v <= 60 else {0: 4, 1: 4},
        )
        for v in range(1, n + 1)
    ]


def test_staleness_is_a_rolling_mean_with_a_quantile_band_not_a_zigzag() -> None:
    from asyncopd.lab.launch.plots import pooled_quantile, staleness_bands, staleness_grid

    # the learner logs each step's histogram with string keys (JSON)
    logged = record_from_dict({"event": "step", "version": 3, "loss": 1.0, "staleness_hist": {"0": 2, "1": 3}})
    assert logged is not None and logged.staleness_hist == {0: 2, 1: 3}
    assert pooled_quantile({0: 1, 1: 8, 5: 1}, 0.1) == 0.0
    assert pooled_quantile({0: 1, 1: 8, 5: 1}, 0.9) == 1.0
    assert pooled_quantile({0: 1, 1: 8, 5: 1}, 0.95) == 5.0
    xs, mean, low, high = staleness_bands(_zigzag_steps(), window=10)
    assert xs == list(range(1, 121))
    # pooled over 10 steps the alternation averages out: 1.5 while both kinds alternate ...
    assert mean[20:58] == pytest.approx([1.5] * 38)
    assert low[30] == 1.0 and high[30] == 2.0
    # ... and the drop after version 60 shows as a trend, not as noise
    assert mean[-1] == pytest.approx(0.5) and (low[-1], high[-1]) == (0.0, 1.0)
    columns, rows = staleness_grid(_zigzag_steps(), max_columns=12)
    assert columns == list(range(1, 121, 10)) and len(rows) == 3
    for c in range(12):
        assert sum(row[c] for row in rows) == pytest.approx(1.0)
    assert rows[2][0] == pytest.approx(0.5) and rows[0][-1] == pytest.approx(0.5) and rows[2][-1] == 0.0


def test_every_plot_title_names_the_run_and_its_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncopd.lab.launch.plots import write_report_plots
    from matplotlib.figure import Figure

    titles: dict[str, str] = {}
    save = Figure.savefig

    def recording_savefig(fig: Figure, path: Path, *args: object, **kwargs: object) -> None:
        texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []  # type: ignore[attr-defined]
        titles[Path(path).name] = " | ".join(texts + [ax.get_title() for ax in fig.axes])
        save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    report = {
        "name": "toy",
        "mode": "async",
        "max_staleness": 2,
        "estimator": "forward_kl_topk(K=8, tail=bucket)",
        "staleness_histogram": {"0": 10, "1": 300, "2": 200},
        "accuracy_before": 0.4,
        "accuracy_after": 0.9,
        "steps": 120,
        "wall_seconds": 120.0,
    }
    paths = write_report_plots(report, _zigzag_steps(), tmp_path)
    assert (
        sorted(titles)
        == sorted(p.name for p in paths)
        == [
            "accuracy.png",
            "kl.png",
            "staleness.png",
            "throughput.png",
        ]
    )
    for name, text in titles.items():
        assert "toy: async (max_staleness 2)" in text, f"{name}: {text}"
    assert "staleness over training" in titles["staleness.png"] and "staleness by version" in titles["staleness.png"]
