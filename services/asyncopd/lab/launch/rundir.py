"""Where a local run writes, and which run `--resume` continues.

`output_dir` may name `{name}` and `{timestamp}`: the default `runs/{name}/{timestamp}` gives
every run its own directory, with a `latest` link beside them pointing at the newest. An
`output_dir` without `{timestamp}` is one fixed directory; a run that finds an earlier run
there moves it aside to `<dir>.previous-<its time>` — nothing of an earlier run is deleted.

`--resume auto` continues the run `latest` points at (or the fixed directory); `--resume PATH`
the run in PATH. A run can be resumed once its learner has written a checkpoint; the user's
own config (before endpoints and ports were filled in) is kept in `run-config.yaml` so a resume
needs no `-c`.

It knows directory names and the few files that mark a run; nothing about what runs in it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TIMESTAMP_FORMAT = "%Y%m%d-%H%M%S"
LATEST_LINK = "latest"
RUN_CONFIG_NAME = "run-config.yaml"  # the user's config of the run, for --resume without -c
CHECKPOINTS = "checkpoints"


class ResumeError(ValueError):
    """The run named by --resume cannot be continued (no such run, or no checkpoint in it)."""


def is_timestamped(template: str) -> bool:
    return "{timestamp}" in template


def expand(template: str, name: str, timestamp: str) -> Path:
    """`template` with `{name}` and `{timestamp}` filled in (other braces are left alone)."""
    return Path(template.replace("{name}", name).replace("{timestamp}", timestamp))


def plan_run_dir(template: str, name: str, now: float | None = None) -> Path:
    """The directory a new run will use (absolute; not created). Timestamped names that are
    already taken (two runs in one second) get a `-2`, `-3`, ... suffix."""
    stamp = time.strftime(TIMESTAMP_FORMAT, time.localtime(now))
    path = expand(template, name, stamp).resolve()
    if not is_timestamped(template):
        return path
    n = 2
    while path.exists():
        path = expand(template, name, f"{stamp}-{n}").resolve()
        n += 1
    return path


def holds_a_run(directory: Path) -> bool:
    """True when `directory` exists and is not empty."""
    return directory.is_dir() and any(directory.iterdir())


def move_aside(directory: Path) -> Path | None:
    """Rename an earlier run in `directory` to `<dir>.previous-<its time>`; None when there was none."""
    if not holds_a_run(directory):
        return None
    stamp = time.strftime(TIMESTAMP_FORMAT, time.localtime(directory.stat().st_mtime))
    target = directory.with_name(f"{directory.name}.previous-{stamp}")
    n = 2
    while target.exists():
        target = directory.with_name(f"{directory.name}.previous-{stamp}-{n}")
        n += 1
    os.rename(directory, target)
    return target


def point_latest(run_dir: Path) -> Path:
    """Make `<parent>/latest` a relative link to `run_dir`, replaced atomically."""
    link = run_dir.parent / LATEST_LINK
    tmp = run_dir.parent / f".{LATEST_LINK}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)
    return link


def prepare_run_dir(run_dir: Path, template: str) -> Path | None:
    """Create a new run's directory (a timestamped one gets the `latest` link); returns where an
    earlier run in a fixed directory was moved, or None."""
    moved = None if is_timestamped(template) else move_aside(run_dir)
    # A timestamped directory is this run's alone; a fixed one may exist, empty.
    run_dir.mkdir(parents=True, exist_ok=not is_timestamped(template))
    if is_timestamped(template):
        point_latest(run_dir)
    return moved


@dataclass(frozen=True)
class ResumePoint:
    """A run to continue: its directory and the version of its newest checkpoint."""

    run_dir: Path
    checkpoint: Path
    version: int


def find_run(spec: str, template: str, name: str) -> Path:
    """The run directory `--resume spec` names: 'auto' = the `latest` link of `template`'s runs
    (or its fixed directory), else a path (a run directory or a `latest` link)."""
    if spec == "auto":
        if is_timestamped(template):
            parent = expand(template, name, "x").parent
            link = parent / LATEST_LINK
            if not link.exists():
                raise ResumeError(f"--resume auto: no {link} (no earlier run of {name!r} under {parent})")
            return link.resolve()
        return expand(template, name, "").resolve()
    path = Path(spec).resolve()
    if not path.is_dir():
        raise ResumeError(f"--resume {spec}: no such run directory")
    return path


def resume_point(run_dir: Path) -> ResumePoint:
    """The newest checkpoint of the run in `run_dir` (the learner verifies its digests when it
    loads it, falling back to an older one if it must)."""
    root = run_dir / CHECKPOINTS
    candidates = sorted(p for p in root.glob("step-*") if (p / "learner.json").is_file())
    pointer = root / "LATEST"
    if pointer.is_file() and (root / pointer.read_text().strip() / "learner.json").is_file():
        newest = root / pointer.read_text().strip()
    elif candidates:
        newest = candidates[-1]
    else:
        raise ResumeError(
            f"{run_dir} has no learner checkpoint (in {root}) to resume from: the run ended before its "
            "learner wrote one (learner.checkpoint_every, or a clean stop)"
        )
    version = int(json.loads((newest / "learner.json").read_text())["version"])
    return ResumePoint(run_dir, newest, version)
