"""What the study runs: the rows of its three parts as config overrides, and the cells they need.

A *cell* is one training run: the base config + a row's `loss.*` overrides + `seed=...`, at one
fixed staleness. Rows of different parts that name the same overrides at the same staleness
share a cell (part 1's uncorrected reverse KL at s = 4, 8 is part 2's `none` row), so each is
trained once. The probe (part 3a) has its own estimator list: it trains nothing.

Choices (reported in study.md):
- reverse KL in parts 1 and 2 is `reverse_kl_mc` with N = the config's K (8): the same number of
  teacher scores per position as forward top-K, so the two directions get the same cache budget.
  Part 1 uses it as the pipeline would without the OPD fix: the reverse-KL signal computed at
  rollout time (advantage=rollout) and no importance correction (correction=none).
- the RL stabilizers of part 2 act on that rollout-time signal (advantage=rollout), as they act
  on a reward fixed at rollout time in RL; the OPD fix recomputes it (advantage=recompute).
  Ratio handling is matched (issue 18): every clipped row is compared with recompute at the same
  clip 0.2 (the paper code's default for every policy-gradient mode), every unclipped row with
  recompute unclipped (the paper's AsyncOPD configs, clip 1e6). rollout + IS + clip 0.2 is the
  paper code's uncorrected baseline (it has no "none": turning IS off there forces recompute).
  Both M2POs run (`m2po` = the masking rule, `m2po_clip` = the paper code's dynamic clip), and
  decoupled PPO in both its variants (behaviour weight masked / truncated above the cap). "none"
  also runs with a leave-one-out mean baseline (`loss.baseline=mean`): it has none of its own.
- every rollout batch is `minibatches_per_batch` optimizer steps (the paper code's 4; π_prox is
  fixed per rollout batch), and versions and staleness count rollout batches, as in that code.
- part 3 trains at staleness 1 (one-step-off, the mildest asynchrony) with the MC-correctable
  estimator (recompute + is) for N = 1, 4, 16, 32 (draws are with replacement, so N may exceed
  |V|; `StudySize.train_mc_sizes`); the offline probe draws N = 64 too.
- part 4 ("wide") is part 3's comparison where the top-K misses mass: the wide-vocabulary world
  (`--wide-config`, configs/wide.yaml: the Qwen3 tokenizer, 151,936 rows, 279-token responses, a
  teacher whose top-8 misses ~16 % of its mass), sparse top-K (K = 8, 64) vs MC N = 1, 8, 64,
  plus forward top-K (K = 8, 64) at its own lr (`wide_forward_lr`, 1e-4: forward KL overshoots
  at the config's 3e-4 there); every cell reports the dense held-out KL(π‖p) with accuracy.
  Its rows carry `world="wide"`, so their cells are trained from the wide config.

It knows config overrides and numbers; nothing of models or processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

TOY, WIDE = "toy", "wide"
"""The worlds a cell trains in: the `-c` config (the toy) or `--wide-config` (part 4)."""

PART_NAMES = {"wide": 4}
"""Parts that also go by a name on the command line (`--parts wide`)."""


@dataclass(frozen=True)
class Row:
    """One line of a table: its label and the `loss.*` overrides that select the estimator."""

    label: str
    overrides: tuple[str, ...]
    reference: str | None = None
    """Label of the row a table's Δ column compares this one with (matched ratio handling)."""
    world: str = TOY
    """Which config the row's cells train from (`TOY` = `-c`, `WIDE` = `--wide-config`)."""


@dataclass(frozen=True)
class Cell:
    """One training run: a row's overrides at a fixed staleness and seed, in one world."""

    overrides: tuple[str, ...]
    staleness: int
    seed: int
    world: str = TOY

    @property
    def key(self) -> str:
        where = "" if self.world == TOY else f" | world={self.world}"
        return f"{' '.join(self.overrides)} | s={self.staleness} | seed={self.seed}{where}"


@dataclass(frozen=True)
class StudySize:
    """How big the study is; `quick()` is the tiny size the end-to-end test runs."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 150
    test_size: int = 200
    part1_staleness: tuple[int, ...] = (0, 1, 2, 4, 8)
    part2_staleness: tuple[int, ...] = (4, 8)
    part3_staleness: int = 1
    train_mc_sizes: tuple[int, ...] = (1, 4, 16, 32)
    probe_mc_sizes: tuple[int, ...] = (1, 4, 16, 64)
    probe_topk_sizes: tuple[int, ...] = (1, 2, 4, 8)
    draws: int = 32
    minibatches_per_batch: int = 4
    """Optimizer steps per rollout batch (`learner.mini_batches`); a version is one rollout batch."""
    calibration_target: float = 1e-3
    """`--calibrate`: the median (log π_θ/μ)² one version of staleness should produce."""
    calibration_steps: int = 12
    """`--calibrate`: rollout batches per calibration run."""
    held_out_size: int = 8
    """Held-out sequences (the teacher's samples on test prompts) for every cell's dense KL(π‖p)."""
    wide_steps: int = 4
    """Part 4: rollout batches per wide-world cell (279-token rollouts; ~7 min a cell on a loaded 2-core box)."""
    wide_test_size: int = 16
    """Part 4: greedy test prompts per wide-world evaluation (279-token responses)."""
    wide_batch_size: int = 4
    """Part 4: rollouts per batch (`learner.batch_size`, one per mini-batch); 0 = the wide config's (8)."""
    wide_max_tokens: int = 0
    """Part 4: response length cap (`rollout.sampling.max_tokens`; 0 = the config's, which holds the
    task's 279 tokens). `quick()` cuts responses short (truncated rollouts): a smoke run, not a result."""
    wide_topk_sizes: tuple[int, ...] = (8, 64)
    """Part 4: K of the sparse (student top-K) and forward (teacher top-K) rows."""
    wide_mc_sizes: tuple[int, ...] = (1, 8, 64)
    """Part 4: N of the MC reverse-KL rows."""
    wide_forward_lr: float = 1e-4
    """Part 4: lr of the forward-KL rows (at the wide config's 3e-4 forward KL overshoots); with a
    calibrated wide lr, the smaller of the two."""
    wide_calibration_steps: int = 4
    """`--calibrate`, part 4: rollout batches per wide calibration run (s = 1; the drift of batches 1..)."""
    wide_calibration_rounds: int = 2
    """`--calibrate`, part 4: calibration rounds in the wide world (each one wide cell without evaluation)."""

    @classmethod
    def quick(cls) -> StudySize:
        return cls(
            seeds=(0,),
            steps=3,
            test_size=20,
            part1_staleness=(0, 2),
            part2_staleness=(2,),
            draws=4,
            calibration_steps=3,
            held_out_size=2,
            wide_steps=1,
            wide_test_size=2,
            wide_batch_size=4,
            wide_max_tokens=48,
            wide_calibration_steps=2,
            wide_calibration_rounds=1,
        )

    def steps_of(self, world: str) -> int:
        return self.wide_steps if world == WIDE else self.steps

    def test_size_of(self, world: str) -> int:
        return self.wide_test_size if world == WIDE else self.test_size


def _reverse(*extra: str) -> tuple[str, ...]:
    # tail is unused by reverse_kl_mc and must not be the forward-only 'renorm' for reverse kinds
    return ("loss.tail=bucket", *extra)


@dataclass(frozen=True)
class StudyPlan:
    """The rows of each part for a base config whose K (`loss.k`) is `k`."""

    k: int
    size: StudySize = field(default_factory=StudySize)
    parts: tuple[int, ...] = (1, 2, 3)

    @property
    def worlds(self) -> tuple[str, ...]:
        """The worlds the selected parts train in (the toy's baseline always runs)."""
        return (TOY, WIDE) if 4 in self.parts else (TOY,)

    @property
    def forward_row(self) -> Row:
        return Row(
            f"forward KL, teacher top-{self.k} (forward_kl_topk)", ("loss.kind=forward_kl_topk", f"loss.k={self.k}")
        )

    @property
    def reverse_row(self) -> Row:
        return Row(
            f"reverse KL, MC N={self.k}, rollout-time signal, no correction",
            _reverse("loss.kind=reverse_kl_mc", f"loss.k={self.k}", "loss.advantage=rollout", "loss.correction=none"),
        )

    def part1_rows(self) -> list[Row]:
        return [self.forward_row, self.reverse_row]

    def part2_rows(self) -> list[Row]:
        """Recompute (clip 0.2, unclipped) first, then every stale-signal row with its matched reference."""

        def mc(label: str, advantage: str, correction: str, *extra: str, reference: str | None = None) -> Row:
            overrides = _reverse(
                "loss.kind=reverse_kl_mc",
                f"loss.k={self.k}",
                f"loss.advantage={advantage}",
                f"loss.correction={correction}",
                *extra,
            )
            return Row(f"{label} (advantage={advantage}, correction={correction})", overrides, reference)

        clipped = mc("recompute, clip 0.2", "recompute", "ppo_clip")
        unclipped = mc("recompute, unclipped", "recompute", "is")
        return [
            clipped,
            unclipped,
            mc("PPO clip 0.2 = paper baseline", "rollout", "ppo_clip", reference=clipped.label),
            mc("decoupled PPO, mask", "rollout", "decoupled", "loss.decoupled_mode=mask", reference=clipped.label),
            mc(
                "decoupled PPO, truncate",
                "rollout",
                "decoupled",
                "loss.decoupled_mode=truncate",
                reference=clipped.label,
            ),
            mc("M2PO dynamic clip", "rollout", "m2po_clip", reference=clipped.label),
            mc("M2PO mask", "rollout", "m2po", reference=unclipped.label),
            mc("IS only", "rollout", "is", reference=unclipped.label),
            mc("none", "rollout", "none", reference=unclipped.label),
            mc("none + mean baseline", "rollout", "none", "loss.baseline=mean", reference=unclipped.label),
        ]

    def part3_rows(self) -> list[Row]:
        rows = [
            Row(
                f"sparse top-{self.k} (reverse_kl_topk, tail=bucket)",
                _reverse("loss.kind=reverse_kl_topk", f"loss.k={self.k}"),
            )
        ]
        for n in self.size.train_mc_sizes:
            rows.append(
                Row(
                    f"MC N={n} (reverse_kl_mc, recompute, is)",
                    _reverse(
                        "loss.kind=reverse_kl_mc", f"loss.k={n}", "loss.advantage=recompute", "loss.correction=is"
                    ),
                )
            )
        return rows

    def part4_rows(self) -> list[Row]:
        """The wide world: sparse top-K and MC N (recompute + is, part 3's estimator), then forward top-K."""
        size = self.size
        rows = [
            Row(
                f"sparse top-{k} (reverse_kl_topk, tail=bucket)",
                _reverse("loss.kind=reverse_kl_topk", f"loss.k={k}"),
                world=WIDE,
            )
            for k in size.wide_topk_sizes
        ]
        rows += [
            Row(
                f"MC N={n} (reverse_kl_mc, recompute, is)",
                _reverse("loss.kind=reverse_kl_mc", f"loss.k={n}", "loss.advantage=recompute", "loss.correction=is"),
                world=WIDE,
            )
            for n in size.wide_mc_sizes
        ]
        rows += [
            Row(
                f"forward top-{k} (forward_kl_topk, lr {size.wide_forward_lr:g})",
                ("loss.kind=forward_kl_topk", f"loss.k={k}", f"learner.lr={size.wide_forward_lr:g}"),
                world=WIDE,
            )
            for k in size.wide_topk_sizes
        ]
        return rows

    def probe_overrides(self) -> tuple[str, ...]:
        """The loss section the probe's estimators share (the MC-correctable one)."""
        return _reverse("loss.kind=reverse_kl_mc", "loss.advantage=recompute", "loss.correction=is")

    def probe_estimators(self) -> list[tuple[str, str, int]]:
        """(label, kind, K or N) of every estimator the probe draws."""
        out = [(f"sparse top-{k}", "reverse_kl_topk", k) for k in self.size.probe_topk_sizes]
        out += [(f"MC N={n}", "reverse_kl_mc", n) for n in self.size.probe_mc_sizes]
        return out

    def staleness_of(self, part: int) -> tuple[int, ...]:
        if part == 1:
            return self.size.part1_staleness
        if part == 2:
            return self.size.part2_staleness
        if part in (3, 4):
            return (self.size.part3_staleness,)
        raise ValueError(f"parts are 1, 2, 3, 4; got {part}")

    def row(self, label: str) -> Row:
        """The row of any toy part with this label (part 4's labels repeat part 3's in another world)."""
        for part in (1, 2, 3):
            for row in self.rows_of(part):
                if row.label == label:
                    return row
        raise KeyError(label)

    def calibration_row(self) -> Row:
        """What `--calibrate` trains: the MC-correctable estimator at N = K (its drift is the lr's)."""
        return Row(
            f"calibration (reverse_kl_mc, N={self.k}, recompute, is)",
            _reverse("loss.kind=reverse_kl_mc", f"loss.k={self.k}", "loss.advantage=recompute", "loss.correction=is"),
        )

    def rows_of(self, part: int) -> list[Row]:
        if part == 1:
            return self.part1_rows()
        if part == 2:
            return self.part2_rows()
        if part == 3:
            return self.part3_rows()
        if part == 4:
            return self.part4_rows()
        raise ValueError(f"parts are 1, 2, 3, 4; got {part}")

    def cells(self) -> list[Cell]:
        """Every distinct training cell the selected parts need, in a stable order."""
        seen: dict[str, Cell] = {}
        for part in self.parts:
            for row in self.rows_of(part):
                for s in self.staleness_of(part):
                    for seed in self.size.seeds:
                        cell = Cell(row.overrides, s, seed, row.world)
                        seen.setdefault(cell.key, cell)
        return list(seen.values())


def parse_parts(text: str) -> tuple[int, ...]:
    """`"1,3"` -> (1, 3); `"wide"` -> (4,); only 1, 2, 3, 4 (= wide) are parts."""
    expected = f"--parts {text!r}: expected a comma list of 1, 2, 3, 4 (4 = wide)"
    try:
        parts = tuple(sorted({PART_NAMES.get(p.strip()) or int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise ValueError(expected) from None
    if not parts or any(p not in (1, 2, 3, 4) for p in parts):
        raise ValueError(expected)
    return parts


def seeds_from(base: int, count: int) -> tuple[int, ...]:
    if count < 1:
        raise ValueError(f"--seeds must be >= 1, got {count}")
    return tuple(base + i for i in range(count))


def cells_of(plan: StudyPlan, row: Row, staleness: int) -> Sequence[Cell]:
    """The cells (one per seed) behind one table entry."""
    return [Cell(row.overrides, staleness, seed, row.world) for seed in plan.size.seeds]
