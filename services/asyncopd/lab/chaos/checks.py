"""What a run with injected faults must still satisfy, checked from plain records.

- Accounting across Redis lives: a Redis that restarts empty takes its counters with it, so
  the harness snapshots the cache's accounting right before each wipe (with Redis paused for
  writes, so nothing changes in between). Each snapshot closes one *Redis epoch*; the samples
  it held in flight are counted dropped (`redis_wiped`) — they were lost and their prompts come
  round again. Summed over epochs, produced = trained + dropped + in_flight must hold exactly:
  any difference is a sample that vanished silently.
- The learner's step log (with sample ids): step versions strictly increase over the whole log,
  across learner restarts; no sample id is trained twice by a step whose update survived. A
  `start` event that resumed from checkpoint version c voids the earlier steps with version > c
  (their updates died with the learner that made them); a start without a checkpoint voids all
  earlier steps.
- Prompt positions (a sample id is `<run id>-<dataset position>:<nonce>`, from its admission
  ticket): no position is trained twice by surviving steps (a Redis that lost the prompt cursor
  and replayed positions, or a lost ack, shows up here even when sample ids differ), and the
  positions below the highest one trained that no surviving step trained are no more than the
  samples counted dropped or still in flight (`skipped_positions`): a cursor that jumped ahead
  (a restore past admitted work) leaves more holes than drops.
- Versions polled from the learner while the run went on never go down.

Pure functions over dicts and lists; the harness collects the inputs.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WIPED = "redis_wiped"
_POSITION = re.compile(r"^(?:(s\d+)\.)?[0-9A-Za-z]+-(\d+):")


def prompt_position(sample_id: str) -> tuple[str, int] | None:
    """(cache shard tag, position in that shard's prompt sequence) a sample answered, from its
    ticket (`[s<shard>.]<run id>-<position>`); None for another id form."""
    m = _POSITION.match(sample_id)
    return None if m is None else (m.group(1) or "", int(m.group(2)))


def _merge(into: dict[str, int], more: Mapping[str, Any]) -> None:
    for key, value in more.items():
        into[str(key)] = into.get(str(key), 0) + int(value)


def combined_accounting(epochs: Sequence[Mapping[str, Any]], final: Mapping[str, Any]) -> dict[str, Any]:
    """Sum the cache's accounting over Redis epochs (`epochs`: stats taken before each wipe)."""
    dropped: dict[str, int] = {}
    served: dict[str, int] = {}
    produced = trained = admitted = wiped = 0
    for stats in [*epochs, final]:
        produced += int(stats.get("produced", 0))
        trained += int(stats.get("trained", 0))
        admitted += int(stats.get("admitted", 0))
        _merge(dropped, stats.get("dropped", {}))
        _merge(served, stats.get("staleness_served", {}))
    for stats in epochs:
        wiped += int(stats.get("in_flight", 0))
    if wiped:
        dropped[WIPED] = dropped.get(WIPED, 0) + wiped
    in_flight = int(final.get("in_flight", 0))
    dropped_total = sum(dropped.values())
    return {
        "redis_epochs": len(epochs) + 1,
        "admitted": admitted,
        "produced": produced,
        "trained": trained,
        "dropped": dict(sorted(dropped.items())),
        "dropped_total": dropped_total,
        "in_flight": in_flight,
        "unaccounted": produced - trained - dropped_total - in_flight,
        "staleness_served": {k: served[k] for k in sorted(served, key=int)},
    }


@dataclass
class StepLogVerdict:
    """What the step log says about versions and duplicates."""

    steps: int = 0
    surviving_steps: int = 0
    void_steps: int = 0
    starts: int = 0
    samples_surviving: int = 0
    samples_void: int = 0
    trained_twice: list[str] = field(default_factory=list)
    version_regressions: list[str] = field(default_factory=list)
    missing_sample_ids: int = 0
    positions_trained: int = 0
    positions_trained_twice: list[int] = field(default_factory=list)
    # the first few positions trained twice: "position: sample id @ step version, ..." (what a
    # failure report needs to name the fault that did it)
    position_twice_detail: list[str] = field(default_factory=list)
    position_holes: int = 0  # positions below the highest trained one that no surviving step trained
    unparsed_sample_ids: int = 0

    def problems(self) -> list[str]:
        out = [f"version went backwards: {r}" for r in self.version_regressions]
        if self.trained_twice:
            shown = ", ".join(self.trained_twice[:5])
            out.append(f"{len(self.trained_twice)} sample(s) trained twice by surviving steps: {shown}")
        if self.positions_trained_twice:
            shown = ", ".join(str(p) for p in self.positions_trained_twice[:5])
            out.append(
                f"{len(self.positions_trained_twice)} prompt position(s) trained twice by surviving steps: {shown}"
                + (f" ({'; '.join(self.position_twice_detail)})" if self.position_twice_detail else "")
            )
        if self.missing_sample_ids:
            out.append(f"{self.missing_sample_ids} step(s) logged without sample ids (set learner.log_sample_ids)")
        return out


def check_step_log(records: Iterable[Mapping[str, Any]]) -> StepLogVerdict:
    """Versions and duplicate training in the learner's JSONL records (in file order)."""
    verdict = StepLogVerdict()
    steps: list[dict[str, Any]] = []  # {"version", "ids", "void"}
    last_version: int | None = None
    for rec in records:
        event = rec.get("event")
        if event == "start":
            verdict.starts += 1
            checkpoint = rec.get("checkpoint_version")
            for step in steps:
                if not step["void"] and (checkpoint is None or step["version"] > int(checkpoint)):
                    step["void"] = True
            start_version = int(rec.get("version", 0))
            if last_version is not None and start_version < last_version:
                verdict.version_regressions.append(f"a restarted learner began at {start_version} after {last_version}")
        elif event == "step":
            version = int(rec["version"])
            if last_version is not None and version <= last_version:
                verdict.version_regressions.append(f"step version {version} logged after {last_version}")
            last_version = version
            ids = rec.get("sample_ids")
            if ids is None:
                verdict.missing_sample_ids += 1
                ids = []
            steps.append({"version": version, "ids": list(ids), "void": False})
    counts: Counter[str] = Counter()
    trained_at: dict[str, list[int]] = {}  # sample id -> versions of the surviving steps that trained it
    for step in steps:
        verdict.steps += 1
        if step["void"]:
            verdict.void_steps += 1
            verdict.samples_void += len(step["ids"])
        else:
            verdict.surviving_steps += 1
            verdict.samples_surviving += len(step["ids"])
            counts.update(step["ids"])
            for sid in step["ids"]:
                trained_at.setdefault(sid, []).append(step["version"])
    verdict.trained_twice = sorted(sid for sid, n in counts.items() if n > 1)
    positions: Counter[tuple[str, int]] = Counter()
    for sid, n in counts.items():
        pos = prompt_position(sid)
        if pos is None:
            verdict.unparsed_sample_ids += 1
        else:
            positions[pos] += n
    verdict.positions_trained = len(positions)
    verdict.positions_trained_twice = sorted(p for (_, p), n in positions.items() if n > 1)
    twice = {key for key, n in positions.items() if n > 1}
    by_position: dict[tuple[str, int], list[str]] = {}
    for sid in sorted(trained_at):
        pos = prompt_position(sid)
        if pos in twice:
            by_position.setdefault(pos, []).extend(f"{sid} @ v{v}" for v in trained_at[sid])
    verdict.position_twice_detail = [
        f"{p}: {', '.join(by_position[(s, p)])}" for s, p in sorted(by_position, key=lambda sp: sp[1])[:3]
    ]
    for shard in {s for s, _ in positions}:
        mine = [p for s, p in positions if s == shard]
        verdict.position_holes += max(mine) + 1 - len(mine)
    return verdict


def skipped_positions(verdict: StepLogVerdict, accounting: Mapping[str, Any]) -> int:
    """Holes in the trained positions beyond what drops and in-flight samples explain (0 = none
    skipped). Every admitted position is answered by a sample that is trained, dropped (by a
    counted reason) or still in flight, so holes > dropped + in flight means positions were never
    handed out; voided steps' samples are counted by the cache as trained, so they excuse holes too."""
    excused = int(accounting.get("dropped_total", 0)) + int(accounting.get("in_flight", 0)) + verdict.samples_void
    return max(0, verdict.position_holes - excused)


def regressions(versions: Sequence[tuple[float, int]]) -> list[str]:
    """Where a polled version sequence [(seconds, version)] went down."""
    out = []
    for (_, before), (t, after) in itertools.pairwise(versions):
        if after < before:
            out.append(f"polled version fell from {before} to {after} at {t:.1f}s")
    return out


def longest_gap(step_times: Sequence[float], start: float, end: float) -> float | None:
    """The longest time without a learner step inside [start, end] (seconds).

    Each gap between consecutive steps is clipped to the window, so a stall that began before
    `start` (an earlier fault's) or runs past `end` (a later one's) counts only for its part
    inside. None when no step came after `start`.
    """
    times = sorted(step_times)
    if not times or times[-1] <= start:
        return None
    gaps = [min(b, end) - max(a, start) for a, b in itertools.pairwise(times) if b > start and a < end]
    return max(gaps) if gaps else None


def accuracy_in_line(after: float | None, baseline: float | None, tolerance: float) -> tuple[bool | None, str]:
    """Did the faulty run end within `tolerance` of the fault-free accuracy (None: not measured)?"""
    if after is None or baseline is None:
        return None, "not measured"
    ok = after >= baseline - tolerance
    return ok, f"{after:.3f} vs fault-free {baseline:.3f} (tolerance {tolerance:.2f})"
