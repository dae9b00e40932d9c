"""Learner checkpoints: HF-format weights + optimizer/scheduler + version + RNG, written durably.

Layout under `checkpoint_dir`:  step-00000042/ (a loadable HF model directory plus
`learner_state.pt`, `learner.json` and `digests.json`) and `LATEST` (the name of the newest
complete one).

Durability, in the order a write happens:
- the space a checkpoint needs (the size of the newest one, or an estimate from the model)
  is checked before anything is written; when it is short, older checkpoints are pruned first
  (never the newest), and `CheckpointSpaceError` says how much is missing otherwise;
- every file is written to a temporary directory, fsynced, listed with its SHA-256 in
  `digests.json`, and the directory is renamed into place and its parent fsynced; `LATEST` is
  replaced the same way, so a kill or power loss at any moment leaves a complete checkpoint;
- `latest()` verifies the digests of the one `LATEST` names and falls back to the newest
  older checkpoint that verifies (logging what it skipped and why) instead of raising;
- `load_state` reads with `torch.load(weights_only=True)`: no pickle code runs from a shared
  volume.

Sharded learners (`learner.world_size` > 1) write with torch Distributed Checkpoint instead
(`save_sharded`, called by every rank): the weights and AdamW state go to `dcp/` (each rank
its shards, rank 0 the metadata), keyed by parameter name, not by rank, so `load_sharded` reads
them back at any world size, one process included (without a process group); beside them
rank 0 writes an HF copy of the weights (gathered one tensor at a time to its host memory,
`cpu_offload`: what evaluation, serving and `models.student` read; a resume reads `dcp/`), the
tokenizer and `learner_state.pt` with the version, the LR scheduler and rank 0's RNG. The same
rules hold: a temporary directory, fsync, digests over every file, rename, `LATEST`, pruning,
and `latest()`'s fallback. A one-process checkpoint
(HF weights + an optimizer state keyed by position) loads into a sharded learner through
`load_optimizer_by_position`.

It knows files, models and state dicts; it knows nothing of the training loop or services.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_LATEST = "LATEST"
_STATE = "learner_state.pt"
_DIGESTS = "digests.json"
# Free space kept beyond the checkpoint's own size (filesystem metadata, the LATEST pointer).
SPACE_MARGIN = 1.1


class CheckpointSpaceError(OSError):
    """Not enough free space for a checkpoint even after pruning the old ones."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files do not match the digests written with it."""


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != _DIGESTS)


def _checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def needed_bytes(root: Path, model: PreTrainedModel) -> int:
    """What the next checkpoint will take: the newest one's size, or the model's weights x 3
    (weights + AdamW's two moments) before the first."""
    existing = _checkpoints(root)
    if existing:
        return _size(existing[-1])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights


def ensure_space(root: Path, needed: int, free_bytes: int | None = None) -> None:
    """Prune the oldest checkpoints (never below one) until `needed` bytes fit, or raise.

    `free_bytes` overrides the filesystem's answer (tests)."""

    def free() -> int:
        return free_bytes if free_bytes is not None else shutil.disk_usage(root).free

    want = int(needed * SPACE_MARGIN)
    existing = _checkpoints(root)
    # The newest checkpoint is what a resume needs; older ones go first when space is short.
    while free() < want and len(existing) > 1:
        oldest = existing.pop(0)
        released = _size(oldest)
        log.warning("checkpoint: pruning %s before writing (%.1f MiB short)", oldest.name, (want - free()) / 2**20)
        shutil.rmtree(oldest)
        if free_bytes is not None:
            free_bytes += released
    if free() < want:
        raise CheckpointSpaceError(
            f"checkpoint needs ~{want / 2**20:.1f} MiB in {root}, {free() / 2**20:.1f} MiB free "
            f"after pruning to {len(existing)} checkpoint(s): free disk space or lower learner.keep_checkpoints"
        )


def save(
    directory: str | Path,
    model: PreTrainedModel,
    trainer_state: dict[str, Any],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    info: dict[str, Any] | None = None,
    keep: int = 2,
    free_bytes: int | None = None,
) -> Path:
    """Write checkpoint `step-<version>`; point LATEST at it; keep the newest `keep` checkpoints.

    Raises `CheckpointSpaceError` (and writes nothing) when the space it needs is not there."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ensure_space(root, needed_bytes(root, model), free_bytes)
    version = int(trainer_state["version"])
    final = root / f"step-{version:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"trainer": trainer_state, "rng": rng_state()}, tmp / _STATE)
        (tmp / "learner.json").write_text(json.dumps({"version": version, "saved_unix": time.time(), **(info or {})}))
        digests = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
        (tmp / _DIGESTS).write_text(json.dumps(digests, indent=1, sort_keys=True))
        for path in [*_files(tmp), tmp / _DIGESTS]:
            _fsync_file(path)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written directory must not fill the disk
        raise
    _publish(root, tmp, final, keep)
    return final


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the complete, fsynced `tmp` into place as `final`, point LATEST at it (atomically,
    fsynced) and prune to the newest `keep`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{_LATEST}.tmp"
    pointer.write_text(final.name)
    _fsync_file(pointer)
    os.replace(pointer, root / _LATEST)
    _fsync_dir(root)
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def verify(path: str | Path) -> None:
    """Raise `CheckpointCorruptError` unless every file matches `digests.json`."""
    path = Path(path)
    listing = path / _DIGESTS
    if not (path / _STATE).exists() or not listing.exists():
        raise CheckpointCorruptError(f"{path.name} is incomplete (no {_STATE} or {_DIGESTS})")
    digests: dict[str, str] = json.loads(listing.read_text())
    present = {str(p.relative_to(path)) for p in _files(path)}
    if missing := sorted(set(digests) - present):
        raise CheckpointCorruptError(f"{path.name}: missing {missing}")
    for name, want in digests.items():
        if _sha256(path / name) != want:
            raise CheckpointCorruptError(f"{path.name}: {name} does not match its SHA-256 digest")


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint under `directory` that verifies, or None when there is none.

    `LATEST` names the newest; when it is missing, incomplete or corrupt, older checkpoints are
    tried newest first and each one skipped is logged with the reason."""
    root = Path(directory)
    pointer = root / _LATEST
    candidates = list(reversed(_checkpoints(root)))
    if pointer.exists():
        named = root / pointer.read_text().strip()
        candidates = [named, *[c for c in candidates if c != named]]
    for path in candidates:
        try:
            verify(path)
        except CheckpointCorruptError as exc:
            log.error("checkpoint: skipping %s", exc)
            continue
        return path
    return None


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state and RNG state of a checkpoint (the weights load with from_pretrained)."""
    state: dict[str, Any] = torch.load(Path(path) / _STATE, map_location="cpu", weights_only=True)
    return state


_DCP = "dcp"


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint was written by `save_sharded` (weights in Distributed Checkpoint format)."""
    return (Path(path) / _DCP).is_dir()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_sharded(
    directory: str | Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    keep: int = 2,
    free_bytes: int | None = None,
) -> Path:
    """Every rank: write checkpoint `step-<version>` with Distributed Checkpoint (see the module doc).

    `trainer_state` (version, scheduler; no optimizer) is written by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    root = Path(directory)
    version = int(trainer_state["version"])
    final = root / f"step-{version:08d}"
    tmp = root / f".tmp-{final.name}-sharded"  # one name every rank computes
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        ensure_space(root, needed_bytes(root, model), free_bytes)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    try:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=tmp / _DCP)  # every rank its shards; a barrier inside
        del state
        # a collective: every rank sends its shards, rank 0 alone receives (others get {})
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(tmp, state_dict=full)
            del full
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save({"trainer": trainer_state, "rng": rng_state()}, tmp / _STATE)
            info = {"version": version, "saved_unix": time.time(), "format": "dcp", "world_size": world_size}
            (tmp / "learner.json").write_text(json.dumps(info))
            digests = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
            (tmp / _DIGESTS).write_text(json.dumps(digests, indent=1, sort_keys=True))
            for path in [*_files(tmp), tmp / _DIGESTS]:
                _fsync_file(path)
            for sub in [tmp / _DCP, tmp]:
                _fsync_dir(sub)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        _publish(root, tmp, final, keep)
    _barrier()  # no rank goes on before the checkpoint is complete
    return final


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and optimizer state of a `save_sharded` checkpoint into `model` (sharded or not) and
    `optimizer`: every rank of the current world, or one process without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights, optim = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    dcp.load({"model": weights, "optim": optim}, checkpoint_id=Path(path) / _DCP)  # in place
    set_model_state_dict(model, weights)
    set_optimizer_state_dict(model, optimizer, optim)


def load_optimizer_by_position(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A one-process optimizer state (keyed by parameter position) into `optimizer` of the same
    model, sharded or not: positions become parameter names, which shard at any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    by_name: dict[str, Any] = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
