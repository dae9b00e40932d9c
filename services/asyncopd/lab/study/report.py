"""study.md (tables + findings) and study.json (every cell, every seed) from a finished run.

The markdown is generated entirely from the measured numbers (`summary`, `findings`); the
only fixed text describes what was run. It knows the plan and the results; nothing of models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncopd.lab.study.findings import all_findings
from asyncopd.lab.study.plan import WIDE, StudyPlan, StudySize
from asyncopd.lab.study.plots import write_plots
from asyncopd.lab.study.runner import Source, StudyRun
from asyncopd.lab.study.summary import Results, paired, spread

PROBE_STATS = (
    ("relative_bias", "rel. bias ‖E[g]−g*‖/‖g*‖"),
    ("bias_floor", "noise floor √(var/R)"),
    ("relative_variance", "rel. variance E‖g−E[g]‖²/‖g*‖²"),
    ("cosine_of_mean", "cos(E[g], g*)"),
    ("mean_cosine", "mean cos(g, g*)"),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


DRIFT_LABEL = "staleness as drift: median (log π_θ/μ)², cells that trained"


def _drift(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2e}"


def drift_table(results: Results) -> list[str]:
    """Staleness in versions and in measured drift, with the lr calibration when there was one."""
    plan = results.plan
    ss = sorted({*plan.size.part1_staleness, *plan.size.part2_staleness, plan.size.part3_staleness})
    body = []
    for s in ss:
        trained, fell = results.drift_values(s), results.drift_values(s, collapsed=True)
        drift = results.drift(s)
        body.append(
            [
                str(s),
                f"{_drift(drift)} ({len(trained)})",
                _drift(drift / s) if s else "—",
                f"{_drift(results.drift(s, collapsed=True))} ({len(fell)})",
            ]
        )
    lines = [
        "### Table 0: staleness in versions and in measured drift",
        "",
        "Drift = (log π_θ(y) − log μ(y))² over the first mini-batch's samples, measured by the loss before any update "
        "on that batch (MC rows only); median over each cell's batches that are exactly s versions stale, then over "
        "cells (their number in brackets). Cells whose student ended below the untrained one (collapsed: the policy "
        "ran away from μ, so their drift measures the collapse, not the staleness) are counted apart.",
        "",
    ]
    lines += _table(["s (versions)", "median (log π_θ/μ)², cells that trained", "per version", "collapsed cells"], body)
    cal = results.run.calibration
    if cal:
        lines += ["", f"lr calibrated for {cal['target']:g} per version: {_rounds(cal)}; chosen lr {cal['lr']:g}."]
    return lines


def _rounds(cal: dict[str, Any]) -> str:
    return "; ".join(f"lr {r['lr']:.3g} → {_drift(r['drift'])}" for r in cal["rounds"])


def part1_tables(results: Results) -> list[str]:
    plan = results.plan
    ss = plan.size.part1_staleness
    acc = [[row.label, *(results.accuracy(row, s).text() for s in ss)] for row in plan.part1_rows()]
    acc.append([DRIFT_LABEL, *(_drift(results.drift(s)) for s in ss)])
    lines = ["### Table 1a: accuracy (mean ± std over seeds)", ""]
    lines += _table(["estimator", *(f"s={s}" for s in ss)], acc)
    if 0 in ss:
        drop = [[row.label, *(results.drop(row, s).signed() for s in ss if s > 0)] for row in plan.part1_rows()]
        lines += ["", "### Table 1b: change vs s=0 (acc(s) − acc(0), paired by seed, mean ± std)", ""]
        lines += _table(["estimator", *(f"s={s}" for s in ss if s > 0)], drop)
    return lines


def part2_tables(results: Results) -> list[str]:
    plan = results.plan
    ss = plan.size.part2_staleness
    rows = plan.part2_rows()
    body = []
    for row in rows:
        cells = [results.accuracy(row, s).text() for s in ss]
        if row.reference is None:
            deltas = ["—" for _ in ss]
        else:
            ref = plan.row(row.reference)
            deltas = [paired(results.accuracies(row, s), results.accuracies(ref, s)).signed() for s in ss]
        matched = "—" if row.reference is None else row.reference.split(" (")[0]
        body.append([row.label, *cells, matched, *deltas])
    body.append([DRIFT_LABEL, *(_drift(results.drift(s)) for s in ss), "", *("" for _ in ss)])
    lines = [f"### Table 2: reverse KL (reverse_kl_mc, N={plan.k}) under staleness, by correction", ""]
    lines += _table(["correction", *(f"acc s={s}" for s in ss), "compared with", *(f"Δ vs it s={s}" for s in ss)], body)
    lines += [
        "",
        "Ratio handling is matched: clipped rows (PPO clip, decoupled, M2PO dynamic clip) are compared with "
        "recompute at clip 0.2, unclipped ones (M2PO mask, IS only, none) with recompute unclipped.",
    ]
    reference = plan.reverse_row
    if results.has(reference, 0):
        lines += [
            "",
            f"Reference: at s=0 (μ = π_θ) every row has the same expected gradient; the uncorrected row "
            f"reached {results.accuracy(reference, 0).text()} there (part 1).",
        ]
    return lines


def part3_tables(results: Results) -> list[str]:
    plan = results.plan
    lines: list[str] = []
    labels = results.probe_labels()
    if labels:
        n = len(results.run.probes)
        lines += [
            f"### Table 3a: gradient of each estimator vs the dense reverse-KL gradient g* "
            f"(R={plan.size.draws} draws per MC estimator, mean over {n} fixed rollout batch{'es' if n > 1 else ''})",
            "",
        ]
        body = [[label, *(f"{results.probe(label, stat).mean:.4f}" for stat, _ in PROBE_STATS)] for label in labels]
        lines += _table(["estimator", *(title for _, title in PROBE_STATS)], body)
        lines.append("")
    s = plan.size.part3_staleness
    rows = plan.part3_rows()
    if all(results.has(r, s) for r in rows):
        one = rows[1]
        body = [
            [
                row.label,
                results.accuracy(row, s).text(),
                "—" if row is one else paired(results.accuracies(row, s), results.accuracies(one, s)).signed(),
            ]
            for row in rows
        ]
        lines += [f"### Table 3b: accuracy after training at s={s} (mean ± std over seeds)", ""]
        lines += _table(["estimator", "accuracy", f"Δ vs {one.label.split(' (')[0]}"], body)
    return lines


def _short(label: str) -> str:
    return label.split(" (", maxsplit=1)[0]


def _mass(baseline: dict[str, Any], role: str, k: int) -> str:
    value = (baseline.get("held_out") or {}).get(f"{role}_top{k}_missing")
    return "n/a" if value is None else f"{value:.3f}"


def part4_setup(results: Results) -> str:
    """One paragraph: the wide world's config, lrs and cell size."""
    size, wide = results.plan.size, results.run.wide_source
    if wide is None:
        return "Config: not recorded."
    config = wide.config()
    where = f"`{wide.path}`" + (f" with `--set {' '.join(wide.overrides)}`" if wide.overrides else "")
    return (
        f"Config {where}: the Qwen3 tokenizer, tiny Qwen3 teacher and student at "
        f"{config.models.student} / {config.models.teacher}, responses capped at "
        f"{config.rollout.sampling.max_tokens} tokens (the task's are 279). Reverse-KL rows train at lr "
        f"{config.learner.lr:g}; forward rows at {size.wide_forward_lr:g} (forward KL overshoots above 1e-4 there, "
        f"docs/wide-world.md). Each cell: {size.wide_steps} rollout batch{'es' if size.wide_steps > 1 else ''} × "
        f"{config.learner.batch_size} "
        f"rollouts ({config.learner.mini_batches} optimizer steps each), greedy accuracy on {size.wide_test_size} "
        "test prompts and the dense held-out KL(π‖p) after the last step." + _wide_drift(results)
    )


def _wide_drift(results: Results) -> str:
    """The wide world's lr calibration and the drift its MC cells measured at their staleness."""
    s = results.plan.size.part3_staleness
    measured = f" Measured drift in its MC cells at s={s}: median (log π_θ/μ)² {_drift(results.drift(s, WIDE))}."
    cal = results.run.wide_calibration
    if not cal:
        return measured
    return (
        f" lr calibrated in this world for {cal['target']:g} per version: {_rounds(cal)}; chosen lr {cal['lr']:g}."
        + measured
    )


def part4_tables(results: Results) -> list[str]:
    """The wide world: what the top-K misses, then accuracy and dense held-out KL(π‖p) per estimator."""
    plan, run = results.plan, results.run
    base = run.wide_baseline or {}
    s = plan.size.part3_staleness
    rows = plan.part4_rows()
    held = base.get("held_out") or {}
    ks = plan.size.wide_topk_sizes
    lines = [
        f"Held-out set: the teacher's sampled responses to {len(base.get('held_out_response_tokens', []))} test "
        f"prompts ({int(held.get('positions', 0))} response positions, |V| = {base.get('vocab_size', 'n/a')}); "
        "KL(π‖p) summed over the full vocabulary at every position, token mean. What a top-K list misses there "
        "(1 − mass of the K most likely tokens, token mean):",
        "",
    ]
    lines += _table(
        ["model", *(f"top-{k} missing mass" for k in ks)],
        [[role, *(_mass(base, role, k) for k in ks)] for role in ("teacher", "student")],
    )
    before = held.get("reverse_kl")
    lines += [
        "",
        f"Before training: held-out KL(π‖p) {before:.4f}, greedy accuracy student "
        f"{base.get('student_accuracy', math.nan):.3f}, teacher {base.get('teacher_accuracy', math.nan):.3f} "
        f"({base.get('test_size', 0)} test prompts)."
        if before is not None
        else "Before training: not measured.",
        "",
    ]
    if not all(results.has(r, s) for r in rows):
        return lines
    reference = next((r for r in rows if r.label.startswith(f"MC N={max(plan.size.wide_mc_sizes)} ")), rows[0])
    body = []
    for row in rows:
        kls = results.held_out_kls(row, s)
        change = spread([k - before for k in kls]) if before is not None else spread([])
        delta = "—" if row is reference else paired(kls, results.held_out_kls(reference, s)).signed(4)
        body.append(
            [row.label, results.accuracy(row, s).text(), results.held_out_kl(row, s).text(4), change.signed(4), delta]
        )
    steps = plan.size.wide_steps
    lines += [
        f"### Table 4: the wide world after {steps} rollout batch{'es' if steps > 1 else ''} at s={s} "
        "(mean ± std over seeds)",
        "",
    ]
    lines += _table(
        [
            "estimator",
            "accuracy",
            "held-out KL(π‖p)",
            "change vs untrained",
            f"Δ KL vs {reference.label.split(' (')[0]}",
        ],
        body,
    )
    return lines


def markdown(results: Results, source: Source, plots: Sequence[Path], workers: int) -> str:
    plan, run, size = results.plan, results.run, results.plan.size
    base = run.baseline
    config = source.config()
    lines = [
        "# Staleness study on the toy task",
        "",
        "Generated by `asyncopd study` from the numbers in study.json (nothing below is typed in by hand).",
        "",
        "## Setup",
        "",
        f"- config: `{source.path or '(defaults)'}`"
        + (f" with `--set {' '.join(source.overrides)}`" if source.overrides else ""),
        f"- student `{config.models.student}` → teacher `{config.models.teacher}`; greedy test accuracy before "
        f"training {base['student_accuracy']:.3f}, teacher {base['teacher_accuracy']:.3f} "
        f"(on the same {base['test_size']} test prompts)",
        f"- every cell: {size.steps} rollout batches × {config.learner.batch_size} rollouts, each batch "
        f"{config.learner.mini_batches} optimizer steps (π_prox fixed per batch), lr {config.learner.lr}, "
        f"warm-up {config.learner.warmup_steps}, sampling temperature {config.rollout.sampling.temperature}, "
        f"greedy accuracy on {base['test_size']} fixed test prompts after the last step",
        "- staleness fixed exactly, in versions = rollout batches (as in the paper's code): the rollouts of batch t "
        "come from student version max(0, t − s) (checked per batch from the versions the engine stamps on each "
        "rollout); Table 0 gives the same staleness as measured drift",
        f"- seeds {', '.join(map(str, size.seeds))}; differences are paired by seed; a difference is called "
        f"real when it exceeds 2 standard errors over seeds",
        f"- reverse KL in parts 1–2: `reverse_kl_mc` with N = K = {plan.k} samples per position (the same number "
        f"of teacher scores per position as forward top-{plan.k}); part 1 uses the rollout-time signal without "
        f"correction (advantage=rollout, correction=none), i.e. the pipeline without the OPD fix",
        f"- part 3b trains at s={size.part3_staleness} with the MC-correctable estimator (recompute + is) for N = "
        f"{', '.join(map(str, size.train_mc_sizes))} (draws are with replacement, so N may exceed |V|); the offline "
        f"probe draws N up to {max(size.probe_mc_sizes)} (in chunks of ≤ |V| i.i.d. draws, the same estimator)",
        f"- wall time {run.wall_seconds / 60:.1f} min with {workers} worker process(es), one torch thread each; "
        f"{len(run.cells)} trained cells"
        + (f" ({run.reused} jobs taken from an earlier run with `--resume`)" if run.reused else ""),
        "",
    ]
    lines += ["## Staleness", "", *drift_table(results), ""]
    if 1 in plan.parts:
        lines += ["## Part 1: forward vs reverse KL under staleness", "", *part1_tables(results), ""]
    if 2 in plan.parts:
        lines += ["## Part 2: corrections for stale reverse KL", "", *part2_tables(results), ""]
    if 3 in plan.parts:
        lines += ["## Part 3: sparse top-K vs Monte-Carlo reverse KL", "", *part3_tables(results), ""]
    if 4 in plan.parts:
        lines += [
            "## Part 4: sparse top-K vs Monte-Carlo in the wide-vocabulary world",
            "",
            part4_setup(results),
            "",
            *part4_tables(results),
            "",
        ]
    findings = all_findings(results)
    lines += ["## What the toy shows", ""]
    lines += [f.markdown() for f in findings] or ["- (no part ran to completion)"]
    disagreements = [f for f in findings if not f.verdict.startswith("agrees")]
    lines += ["", "## Where it disagrees with the paper (or cannot tell)", ""]
    lines += [f"- {f.part}: {f.verdict}." for f in disagreements] or ["- Nowhere: every finding above agrees."]
    lines += [
        "",
        "## Notes",
        "",
        "- The loss's `kl` metric (the learning curves) is estimator-specific: the top-K forward KL for forward "
        "KL, an importance-sampled estimate of KL(π_θ‖p) on the rollout samples for MC reverse KL; compare curves "
        "within a plot, not across estimators.",
        f"- Small-model, small-step study ({size.steps} rollout batches): effects the paper reports at scale may "
        "not show, and seed noise is large; read the ± columns.",
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    """JSON without NaN (null instead), floats to 6 significant digits (keeps the file small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def study_json(results: Results, source: Source, workers: int) -> dict[str, Any]:
    plan, run = results.plan, results.run
    rows = {
        f"part{p}": [{"label": r.label, "overrides": list(r.overrides)} for r in plan.rows_of(p)] for p in plan.parts
    }
    return _clean(
        {
            "config": source.path,
            "overrides": list(source.overrides),
            "parts": list(plan.parts),
            "size": asdict(plan.size),
            "k": plan.k,
            "workers": workers,
            "wall_seconds": run.wall_seconds,
            "baseline": run.baseline,
            "rows": rows,
            "cells": run.cells,
            "probes": run.probes,
            "calibration": run.calibration,
            "wide_calibration": run.wide_calibration,
            "reused": run.reused,
            "wide_baseline": run.wide_baseline,
            "wide_source": None if run.wide_source is None else asdict(run.wide_source),
            "findings": [asdict(f) for f in all_findings(results)],
        }
    )


def _dump(data: dict[str, Any]) -> str:
    """JSON with one line per top-level key, and one line per cell / probe record."""
    parts = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            body = ",\n  ".join(json.dumps(v) for v in value)
            parts.append(f"{json.dumps(key)}: [\n  {body}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def write_report(results: Results, source: Source, out: Path, workers: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    md = out / "study.md"
    md.write_text(markdown(results, source, plots, workers))
    js = out / "study.json"
    js.write_text(_dump(study_json(results, source, workers)))
    return {"markdown": md, "json": js, **{p.stem: p for p in plots}}


def _source(data: dict[str, Any]) -> Source:
    return Source(data["path"], tuple(data["overrides"]))


def load_results(path: Path) -> tuple[Results, Source, int]:
    """The results, source and worker count saved in a study.json (to re-render its report)."""
    data = json.loads(path.read_text())
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["size"].items()}
    size = StudySize(**fields)
    plan = StudyPlan(k=int(data["k"]), size=size, parts=tuple(data["parts"]))
    run = StudyRun(
        cells=data["cells"],
        probes=data["probes"],
        baseline=data["baseline"],
        wall_seconds=float(data["wall_seconds"]),
        calibration=data.get("calibration"),
        wide_baseline=data.get("wide_baseline"),
        wide_source=None if data.get("wide_source") is None else _source(data["wide_source"]),
        wide_calibration=data.get("wide_calibration"),
        reused=int(data.get("reused") or 0),
    )
    return Results(plan, run), Source(data["config"], tuple(data["overrides"])), int(data["workers"])
