"""Learner checkpoints: HF-format weights + optimizer/scheduler + version + RNG, written atomically.

Layout under `checkpoint_dir`:  step-00000042/ (a loadable HF model directory plus
`learner_state.pt` and `learner.json`) and `LATEST` (the name of the newest complete one).
A checkpoint is written to a temporary directory and renamed into place, and `LATEST` is
replaced atomically, so a kill at any moment leaves the previous checkpoint usable.

It knows files, models and state dicts; it knows nothing of the training loop or services.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

_LATEST = "LATEST"
_STATE = "learner_state.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: str | Path,
    model: PreTrainedModel,
    trainer_state: dict[str, Any],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    info: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step-<version>`; point LATEST at it; keep the newest `keep` checkpoints."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    version = int(trainer_state["version"])
    final = root / f"step-{version:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"trainer": trainer_state, "rng": rng_state()}, tmp / _STATE)
    (tmp / "learner.json").write_text(json.dumps({"version": version, "saved_unix": time.time(), **(info or {})}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{_LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / _LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    pointer = Path(directory) / _LATEST
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / _STATE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state and RNG state of a checkpoint (the weights load with from_pretrained)."""
    # Our own file with optimizer state and RNG tuples: not restricted to tensors.
    state: dict[str, Any] = torch.load(Path(path) / _STATE, map_location="cpu", weights_only=False)
    return state
