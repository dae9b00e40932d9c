"""PNG figures of the study (matplotlib, Agg): accuracy vs staleness, KL learning curves,
corrections, and the estimators' gradient bias/variance.

Each function reads `summary.Results` and writes one file; it returns the path, or None when
the parts it draws did not run. It knows nothing of how the numbers were produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from asyncopd.lab.study.summary import Results


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _tick(label: str) -> str:
    """'PPO clip (advantage=rollout, correction=ppo_clip)' -> 'PPO clip\nrollout + ppo_clip'."""
    name, _, settings = label.partition(" (")
    values = [part.split("=", 1)[-1] for part in settings.rstrip(")").split(", ")] if settings else []
    return f"{name}\n{' + '.join(values)}" if values else name


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def part1_accuracy(results: Results, out: Path) -> Path | None:
    plan = results.plan
    stalenesses = plan.size.part1_staleness
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in plan.part1_rows():
        acc = [results.accuracy(row, s) for s in stalenesses]
        ax.errorbar(
            stalenesses,
            [a.mean for a in acc],
            yerr=[0.0 if a.n < 2 else a.std for a in acc],
            marker="o",
            capsize=3,
            label=row.label,
        )
    base = results.run.baseline
    ax.axhline(base["student_accuracy"], color="grey", ls=":", label="student before training")
    ax.axhline(base["teacher_accuracy"], color="black", ls="--", lw=0.8, label="teacher")
    ax.set_xlabel("staleness s (rollouts from version max(0, t − s))")
    ax.set_ylabel("greedy test accuracy")
    ax.set_title(f"Part 1: KL direction under staleness ({len(results.seeds)} seeds, ±std)")
    ax.legend(fontsize=7)
    return _save(fig, out / "part1_accuracy.png")


def part1_kl(results: Results, out: Path) -> Path | None:
    plan = results.plan
    rows = plan.part1_rows()
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6))
    for ax, row in zip(axes, rows, strict=True):
        for s in plan.size.part1_staleness:
            ax.plot(_smooth(results.kl_curve(row, s)), label=f"s={s}")
        ax.set_yscale("log")
        ax.set_title(row.label, fontsize=8)
        ax.set_xlabel("learner step")
        ax.set_ylabel("loss 'kl' metric (mean over seeds, 5-step avg)")
        ax.legend(fontsize=7)
    return _save(fig, out / "part1_kl.png")


def part2_accuracy(results: Results, out: Path) -> Path | None:
    plan = results.plan
    rows = plan.part2_rows()
    stalenesses = plan.size.part2_staleness
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(stalenesses)
    for j, s in enumerate(stalenesses):
        acc = [results.accuracy(r, s) for r in rows]
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(
            xs, [a.mean for a in acc], width, yerr=[0.0 if a.n < 2 else a.std for a in acc], capsize=3, label=f"s={s}"
        )
    ax.set_xticks([i + width * (len(stalenesses) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([_tick(r.label) for r in rows], fontsize=7, rotation=30, ha="right")
    ax.axhline(results.run.baseline["student_accuracy"], color="grey", ls=":", label="student before training")
    ax.set_ylabel("greedy test accuracy")
    ax.set_title(f"Part 2: stale reverse KL (MC N={plan.k}) by correction")
    ax.legend(fontsize=7)
    return _save(fig, out / "part2_accuracy.png")


def part2_kl(results: Results, out: Path) -> Path | None:
    plan = results.plan
    s = max(plan.size.part2_staleness)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in plan.part2_rows():
        ax.plot(_smooth(results.kl_curve(row, s)), label=row.label.split(" (")[0])
    ax.set_yscale("log")
    ax.set_xlabel("learner step")
    ax.set_ylabel("IS estimate of KL(π_θ‖p) (5-step avg)")
    ax.set_title(f"Part 2: learning curves at s={s}")
    ax.legend(fontsize=7)
    return _save(fig, out / "part2_kl.png")


def part3_gradients(results: Results, out: Path) -> Path | None:
    labels = results.probe_labels()
    mc = [(int(label.split("=")[1]), label) for label in labels if label.startswith("MC N=")]
    sparse = [(int(label.split("-")[1]), label) for label in labels if label.startswith("sparse top-")]
    if not mc:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [n for n, _ in mc]
    left.plot(
        ns, [results.probe(label, "relative_variance").mean for _, label in mc], "o-", label="MC: relative variance"
    )
    left.plot(
        ns, [results.probe(label, "relative_bias").mean for _, label in mc], "s-", label="MC: relative bias (measured)"
    )
    left.plot(
        ns, [results.probe(label, "bias_floor").mean for _, label in mc], "k:", label="MC: noise floor of the bias"
    )
    for k, label in sparse:
        left.axhline(
            results.probe(label, "relative_bias").mean, ls="--", lw=0.8, color=f"C{3 + k % 5}", label=f"{label}: bias"
        )
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("N (MC samples per position)")
    left.set_title("Part 3a: gradient bias / variance vs dense reverse KL", fontsize=9)
    left.legend(fontsize=6)
    names = [label for _, label in sparse] + [label for _, label in mc]
    right.bar(range(len(names)), [results.probe(label, "mean_cosine").mean for label in names])
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, rotation=45, fontsize=7, ha="right")
    right.set_ylabel("mean cosine of one draw to the dense gradient")
    right.set_ylim(0, 1.05)
    return _save(fig, out / "part3_gradients.png")


def part3_accuracy(results: Results, out: Path) -> Path | None:
    plan = results.plan
    rows = plan.part3_rows()
    s = plan.size.part3_staleness
    fig, ax = plt.subplots(figsize=(7, 4))
    acc = [results.accuracy(r, s) for r in rows]
    ax.bar(range(len(rows)), [a.mean for a in acc], yerr=[0.0 if a.n < 2 else a.std for a in acc], capsize=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.label.split(" (")[0] for r in rows], fontsize=8)
    ax.axhline(results.run.baseline["student_accuracy"], color="grey", ls=":", label="student before training")
    ax.set_ylabel("greedy test accuracy")
    ax.set_title(f"Part 3b: accuracy after training at s={s}")
    ax.legend(fontsize=7)
    return _save(fig, out / "part3_accuracy.png")


def write_plots(results: Results, out: Path) -> list[Path]:
    parts = set(results.plan.parts)
    drawn: list[Path | None] = []
    if 1 in parts:
        drawn += [part1_accuracy(results, out), part1_kl(results, out)]
    if 2 in parts:
        drawn += [part2_accuracy(results, out), part2_kl(results, out)]
    if 3 in parts:
        drawn += [part3_gradients(results, out), part3_accuracy(results, out)]
    return [p for p in drawn if p is not None]
