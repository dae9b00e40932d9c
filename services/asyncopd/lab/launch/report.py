"""The run report: assembled from the cache's final accounting, the learner's step log and the
before/after evaluations; checked against the pipeline's invariants; written as JSON and shown
as a short table.

Assembly is pure (plain values in, a JSON-ready dict out) so it is tested without a pipeline.
It never sees a secret: the config goes in only as the fields the report names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from asyncopd.config import RunConfig
from asyncopd.lab.launch.steplog import StepRecord


def run_mode(max_staleness: int) -> str:
    """'sync' for strict synchronous training (bound 0), else 'async'."""
    return "sync" if max_staleness == 0 else "async"


def estimator_label(config: RunConfig) -> str:
    """The estimator and the knobs that matter for it, e.g. 'reverse_kl_mc(N=8, recompute, is)'."""
    loss = config.loss
    if loss.kind == "reverse_kl_mc":
        return f"reverse_kl_mc(N={loss.k}, {loss.advantage}, {loss.correction})"
    if loss.kind in ("forward_kl_topk", "reverse_kl_topk"):
        return f"{loss.kind}(K={loss.k}, tail={loss.tail})"
    return loss.kind


def _int_keys(hist: Mapping[Any, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in hist.items()}


def build_report(
    config: RunConfig,
    cache_stats: Mapping[str, Any],
    steps: Sequence[StepRecord],
    *,
    wall_seconds: float,
    accuracy_before: float | None,
    accuracy_after: float | None,
    accuracy_teacher: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report of one run. `cache_stats` is `CacheClient.stats()` at the end."""
    train_steps = [s for s in steps if s.is_step]
    tokens = [s.tokens for s in train_steps if s.tokens is not None]
    tokens_trained = sum(tokens) if tokens else None
    histogram = _int_keys(cache_stats.get("staleness_served", {}))
    served = [k for k, v in histogram.items() if v > 0]
    dropped = {str(k): int(v) for k, v in cache_stats.get("dropped", {}).items()}
    produced = int(cache_stats.get("produced", 0))
    trained = int(cache_stats.get("trained", 0))
    in_flight = int(cache_stats.get("in_flight", 0))
    final_version = int(cache_stats.get("learner_version", 0))
    steps_done = max([final_version, *(s.version for s in train_steps)]) if (train_steps or final_version) else 0
    gap_closed = None
    if accuracy_before is not None and accuracy_after is not None and accuracy_teacher is not None:
        gap = accuracy_teacher - accuracy_before
        gap_closed = (accuracy_after - accuracy_before) / gap if gap > 0 else None
    kls = [s.kl for s in train_steps if s.kl is not None]
    report: dict[str, Any] = {
        "name": config.name,
        "mode": run_mode(config.max_staleness),
        "max_staleness": config.max_staleness,
        "estimator": estimator_label(config),
        "steps": steps_done,
        "steps_configured": config.learner.steps,
        "batch_size": config.learner.batch_size,
        "rollout_replicas": config.rollout.replicas,
        "teacher_replicas": config.teacher.replicas,
        "samples_trained": trained,
        "tokens_trained": tokens_trained,
        "wall_seconds": round(wall_seconds, 3),
        "train_tokens_per_second": (
            round(tokens_trained / wall_seconds, 3) if tokens_trained is not None and wall_seconds > 0 else None
        ),
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "accuracy_teacher": accuracy_teacher,
        "teacher_gap_closed": None if gap_closed is None else round(gap_closed, 4),
        "kl_first": kls[0] if kls else None,
        "kl_last": kls[-1] if kls else None,
        "staleness_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "max_staleness_served": max(served) if served else None,
        "produced": produced,
        "trained": trained,
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "in_flight": in_flight,
        "admitted": int(cache_stats.get("admitted", 0)),
    }
    report.update(extra or {})
    report["invariant_violations"] = check_invariants(report)
    return report


def check_invariants(report: Mapping[str, Any]) -> list[str]:
    """What a finished run must satisfy; returns a sentence per violation (empty = all hold)."""
    problems: list[str] = []
    produced, trained, in_flight = report["produced"], report["trained"], report["in_flight"]
    dropped_total = sum(int(v) for v in report["dropped"].values())
    if produced != trained + dropped_total + in_flight:
        problems.append(
            f"produced ({produced}) != trained ({trained}) + dropped ({dropped_total}) + in_flight ({in_flight})"
        )
    served = report.get("max_staleness_served")
    if served is not None and served > report["max_staleness"]:
        problems.append(f"a sample with staleness {served} was served; the bound is {report['max_staleness']}")
    return problems


def write_report(report: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "{}"
    return str(value)


def report_table(report: Mapping[str, Any]) -> Table:
    """The short on-screen summary of a report."""
    table = Table(title=f"asyncopd run {report.get('name', '')}: {report['mode']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
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
        "accuracy_teacher",
        "teacher_gap_closed",
        "staleness_histogram",
        "produced",
        "trained",
        "dropped",
        "in_flight",
    ):
        table.add_row(key, _fmt(report.get(key)))
    violations = report.get("invariant_violations") or []
    table.add_row("invariants", "[green]hold[/green]" if not violations else "[red]" + "; ".join(violations) + "[/red]")
    return table
