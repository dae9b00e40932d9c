"""What the toy shows, in sentences computed from the measured numbers, one finding per part.

Each finding states the paper's claim, the toy's numbers behind the comparison and a verdict:
"agrees", "disagrees" or "inconclusive" (the paired difference is within two standard errors
over seeds). Nothing here is a fixed claim: change the numbers and the text changes.

Pure: it reads `summary.Results` and returns strings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from asyncopd.lab.study.gradients import variance_slope
from asyncopd.lab.study.plan import Row
from asyncopd.lab.study.summary import Results, Spread, paired, sign_of, spread


@dataclass(frozen=True)
class Finding:
    part: str
    paper: str
    toy: str
    verdict: str  # agrees | disagrees | inconclusive

    def markdown(self) -> str:
        return f"- **{self.part}: {self.verdict}.** Paper: {self.paper} Toy: {self.toy}"


def _verdict(sign: int, expected: int) -> str:
    if sign == 0:
        return "inconclusive"
    return "agrees" if sign == expected else "disagrees"


def part1(results: Results) -> Finding | None:
    plan = results.plan
    fwd, rev = plan.forward_row, plan.reverse_row
    stale = [s for s in plan.size.part1_staleness if s > 0]
    if 0 not in plan.size.part1_staleness or not stale or not (results.has(fwd, 0) and results.has(rev, 0)):
        return None
    f_drop = results.mean_drop(fwd, stale)
    r_drop = results.mean_drop(rev, stale)
    gap = paired(f_drop, r_drop)  # > 0: forward KL lost less
    worst = max(stale)
    fw, rw = results.drop(fwd, worst), results.drop(rev, worst)
    toy = (
        f"averaged over s ∈ {{{', '.join(map(str, stale))}}}, accuracy changed by {spread(f_drop).signed()} with "
        f"forward KL and {spread(r_drop).signed()} with reverse KL (vs s=0, paired by seed); at s={worst}: "
        f"{fw.signed()} vs {rw.signed()}. Forward minus reverse: {gap.signed()}."
    )
    return Finding(
        "Part 1 (KL direction under staleness)",
        "teacher-weighted forward KL degrades less with staleness than student-weighted reverse KL.",
        toy,
        _verdict(sign_of(gap), +1),
    )


def part2(results: Results) -> Finding | None:
    plan = results.plan
    rows = plan.part2_rows()
    # every stabilizer against the recompute row with the same ratio handling (clip 0.2 / unclipped)
    recompute = rows[0]
    none = _named(rows, "none")
    assert none is not None
    # (IS only and none are not stabilizers: they are the uncorrected signal with / without IS)
    stabilizers = [
        r
        for r in rows
        if r.reference is not None and not {"loss.correction=is", "loss.correction=none"} & set(r.overrides)
    ]
    stalenesses = [s for s in plan.size.part2_staleness if all(results.has(r, s) for r in rows)]
    if not stalenesses:
        return None
    pieces, worse, better = [], 0, 0
    for s in stalenesses:
        ranked = sorted(rows, key=lambda r: results.accuracy(r, s).mean, reverse=True)
        best = ranked[0]
        diffs = []
        for row in stabilizers:
            assert row.reference is not None
            d = paired(results.accuracies(row, s), results.accuracies(plan.row(row.reference), s))
            sign = sign_of(d)
            worse += sign < 0
            better += sign > 0
            diffs.append(f"{_short(row.label)} {d.signed()}")
        vs_none = paired(
            results.accuracies(plan.row(none.reference or recompute.label), s), results.accuracies(none, s)
        )
        before = float(results.run.baseline["student_accuracy"])
        below = [_short(r.label) for r in rows if results.accuracy(r, s).mean < before]
        pieces.append(
            f"at s={s} the best row is {_short(best.label)} ({results.accuracy(best, s).text()}); "
            f"stabilizer minus matched recompute: {', '.join(diffs)}; recompute unclipped minus none: "
            f"{vs_none.signed()}; "
            f"{len(below)} of {len(rows)} rows end below the untrained student ({before:.3f})"
            + (f": {', '.join(below)}" if below else "")
        )
    total = len(stabilizers) * len(stalenesses)
    # the claim is "no improvement over recompute": one stabilizer above it refutes it; some below
    # it support it; all within noise cannot tell
    verdict = "disagrees" if better else ("agrees" if worse else "inconclusive")
    toy = "; ".join(pieces) + (
        f". Of {total} stabilizer/staleness pairs, {worse} are significantly below recompute and {better} above."
    )
    return Finding(
        "Part 2 (stabilizing stale reverse KL)",
        "RL stabilizers (PPO clip, decoupled PPO, M2PO) do not improve over recomputing the reverse-KL "
        "signal at the learner.",
        toy,
        verdict,
    )


def part2_recompute(results: Results) -> Finding | None:
    """The second half of the paper's Part 2 claim: recompute does better than the uncorrected
    pipeline, i.e. the paper code's baseline (rollout advantage + IS + clip 0.2), at matched clipping."""
    plan = results.plan
    rows = plan.part2_rows()
    recompute = rows[0]
    baseline = _named(rows, "PPO clip 0.2 = paper baseline")
    none = _named(rows, "none")
    stalenesses = [s for s in plan.size.part2_staleness if all(results.has(r, s) for r in rows)]
    if baseline is None or none is None or not stalenesses:
        return None
    diffs = {s: paired(results.accuracies(recompute, s), results.accuracies(baseline, s)) for s in stalenesses}
    unclipped = plan.row(none.reference or recompute.label)
    toy = (
        f"{_short(recompute.label)} minus {_short(baseline.label)} (both clip 0.2): "
        + ", ".join(f"{d.signed()} at s={s}" for s, d in diffs.items())
        + "; measured drift at those staleness values "
        + ", ".join(f"{results.drift(s):.2e}" for s in stalenesses)
        + f". Against the signal without any correction (none, no counterpart in the paper's code), "
        f"{_short(unclipped.label)} is "
        + ", ".join(
            f"{paired(results.accuracies(unclipped, s), results.accuracies(none, s)).signed()} at s={s}"
            for s in stalenesses
        )
        + "."
    )
    signs = {sign_of(d) for d in diffs.values()}
    verdict = "disagrees" if -1 in signs else ("agrees" if signs == {1} else "inconclusive")
    return Finding(
        "Part 2b (recompute vs the uncorrected pipeline)",
        "recomputing the reverse-KL signal at the learner does better than the uncorrected asynchronous pipeline "
        "(the paper code's baseline: rollout-time advantage, IS, PPO clip 0.2).",
        toy,
        verdict,
    )


def part3_gradients(results: Results) -> Finding | None:
    labels = results.probe_labels()
    mc = [(int(label.split("=")[1]), label) for label in labels if label.startswith("MC N=")]
    sparse = [label for label in labels if label.startswith("sparse top-")]
    if not mc or not sparse:
        return None
    k = results.plan.k
    headline = f"sparse top-{k}" if f"sparse top-{k}" in sparse else sparse[-1]
    s_bias = results.probe(headline, "relative_bias").mean
    ratios = [results.probe(label, "relative_bias").mean / results.probe(label, "bias_floor").mean for _, label in mc]
    variances = [results.probe(label, "relative_variance").mean for _, label in mc]
    slope = variance_slope([n for n, _ in mc], variances) if len(mc) > 1 and min(variances) > 0 else math.nan
    largest = mc[-1][1]
    mc_unbiased = all(r < 2.5 for r in ratios)
    toy = (
        f"{headline}: relative bias {s_bias:.4f} with zero variance (deterministic); the sparser "
        + ", ".join(
            f"{label} {results.probe(label, 'relative_bias').mean:.3f}" for label in sparse if label != headline
        )
        + f". MC: measured bias / noise floor = {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(≈1 is what an unbiased estimator shows from {results.plan.size.draws} draws); relative variance "
        + ", ".join(f"N={n}: {v:.3f}" for (n, _), v in zip(mc, variances, strict=True))
        + f", log-log slope {slope:.2f} (−1 = 1/N); single-draw cosine to the dense gradient "
        f"{results.probe(mc[0][1], 'mean_cosine').mean:.2f} at N={mc[0][0]} → "
        f"{results.probe(largest, 'mean_cosine').mean:.2f} at N={mc[-1][0]}."
    )
    noisiest = math.sqrt(results.probe(largest, "relative_variance").mean)
    if s_bias < noisiest:
        toy += (
            f" On this toy the {headline} bias is below the one-step noise of even the largest MC estimator "
            f"(relative std {noisiest:.3f} at N={mc[-1][0]}): the student's top-{k} holds almost all of its mass "
            "(vocabulary 32), so the bias side of the trade-off only shows at smaller K."
        )
    ok = mc_unbiased and (math.isnan(slope) or -1.4 < slope < -0.6) and s_bias > 0
    return Finding(
        "Part 3a (cache bias vs variance)",
        "a sparse top-K cache gives a biased, low-variance reverse-KL gradient; MC is unbiased "
        "(MC-correctable) and multi-sample MC cuts the one-sample variance ~1/N.",
        toy,
        "agrees" if ok else "disagrees",
    )


def part3_accuracy(results: Results) -> Finding | None:
    plan = results.plan
    rows = plan.part3_rows()
    s = plan.size.part3_staleness
    if not all(results.has(r, s) for r in rows) or len(rows) < 3:
        return None
    sparse, one, many = rows[0], rows[1], rows[-1]
    d_many = paired(results.accuracies(many, s), results.accuracies(one, s))
    best_mc = max(rows[1:], key=lambda r: results.accuracy(r, s).mean)
    d_sparse = paired(results.accuracies(best_mc, s), results.accuracies(sparse, s))
    toy = (
        f"at s={s}: "
        + ", ".join(f"{_short(r.label)} {results.accuracy(r, s).text()}" for r in rows)
        + f". {_short(many.label)} minus {_short(one.label)}: {d_many.signed()}; best MC ({_short(best_mc.label)}) "
        f"minus sparse: {d_sparse.signed()}."
    )
    return Finding(
        "Part 3b (accuracy by estimator)",
        "multi-sample MC trains better than one-sample MC (lower variance, still MC-correctable).",
        toy,
        _verdict(sign_of(d_many), +1),
    )


def part4(results: Results) -> Finding | None:
    """The wide world: sparse top-K vs MC with the same number of teacher scores per position (N = K)."""
    plan = results.plan
    s = plan.size.part3_staleness
    rows = plan.part4_rows()
    if not all(results.has(r, s) for r in rows):
        return None
    by_label = {_short(r.label): r for r in rows}
    pairs = [
        (by_label[f"sparse top-{k}"], by_label[f"MC N={k}"])
        for k in plan.size.wide_topk_sizes
        if f"sparse top-{k}" in by_label and f"MC N={k}" in by_label
    ]
    if not pairs:
        return None
    mc = sorted(plan.size.wide_mc_sizes)
    held = (results.run.wide_baseline or {}).get("held_out") or {}
    k0 = pairs[0][0].label
    pieces, signs = [], []
    for sparse, sampled in pairs:
        d = paired(results.held_out_kls(sparse, s), results.held_out_kls(sampled, s))  # > 0: MC ends closer
        signs.append(sign_of(d))
        k = _short(sparse.label).removeprefix("sparse top-")
        miss = held.get(f"student_top{k}_missing")
        closer = {1: "MC closer", -1: "sparse closer", 0: "within 2 s.e."}[sign_of(d)]
        where = f" (the student's top-{k} misses {miss:.3f} of its mass)" if miss is not None else ""
        pieces.append(f"{_short(sparse.label)} minus {_short(sampled.label)} {d.signed(4)}, {closer}{where}")
    many = paired(
        results.held_out_kls(by_label[f"MC N={mc[-1]}"], s), results.held_out_kls(by_label[f"MC N={mc[0]}"], s)
    )
    toy = (
        "held-out KL(π‖p) after training: "
        + ", ".join(f"{_short(r.label)} {results.held_out_kl(r, s).text(4)}" for r in rows)
        + f". Paired (same seed): {'; '.join(pieces)}; MC N={mc[-1]} minus N={mc[0]} {many.signed(4)}."
    )
    headline = signs[0]
    return Finding(
        "Part 4 (sparse vs sampled where the top-K misses mass)",
        f"where the student's top-K misses a real share of its mass a sparse top-K cache is biased, so MC at the "
        f"same number of teacher scores per position (N = K, here {_short(k0)} vs MC) ends closer to the teacher.",
        toy,
        _verdict(headline, +1),
    )


def _short(label: str) -> str:
    return label.split(" (", maxsplit=1)[0]


def _named(rows: list[Row], name: str) -> Row | None:
    """The row whose label, before its settings in brackets, is `name`."""
    return next((r for r in rows if _short(r.label) == name), None)


def all_findings(results: Results) -> list[Finding]:
    parts = set(results.plan.parts)
    out = [
        part1(results) if 1 in parts else None,
        part2(results) if 2 in parts else None,
        part2_recompute(results) if 2 in parts else None,
        part3_gradients(results) if 3 in parts else None,
        part3_accuracy(results) if 3 in parts else None,
        part4(results) if 4 in parts else None,
    ]
    found = [f for f in out if f is not None]
    if len(results.seeds) < 2:  # no error bars: say so next to every accuracy verdict
        found = [
            f if f.part.startswith("Part 3a") else dataclasses.replace(f, verdict=f"{f.verdict} (one seed: sign only)")
            for f in found
        ]
    return found


__all__ = ["Finding", "Spread", "all_findings"]
