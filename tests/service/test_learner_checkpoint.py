"""Checkpoint -> resume of the trainer: same version, bit-identical weights, identical next step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from asyncopd.learner import checkpoint
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss
from test_learner_step import Generated, generate, load, scored_samples
from tiny_models import make_tiny_qwen3
from transformers import Qwen3ForCausalLM

pytestmark = pytest.mark.service


def flat(model: Qwen3ForCausalLM) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def make_trainer(model: Qwen3ForCausalLM) -> Trainer:
    return Trainer(model, OPDLoss("reverse_kl_mc", correction="is"), lr=5e-3, warmup_steps=3, micro_batch_size=4)


def test_resume_continues_at_the_same_version_with_identical_weights(tmp_path: Path) -> None:
    student_dir = make_tiny_qwen3(tmp_path / "student", seed=1)
    teacher_dir = make_tiny_qwen3(tmp_path / "teacher", seed=2, scale=4.0)
    generated: Generated = generate(load(student_dir), load(teacher_dir), n=8)
    samples = scored_samples(generated, "reverse_kl_mc")

    model = load(student_dir)
    trainer = make_trainer(model)
    trainer.train(samples)
    trainer.train(samples)
    torch.manual_seed(1234)
    path = checkpoint.save(tmp_path / "ckpt", model, trainer.state_dict(), keep=1)
    assert checkpoint.latest(tmp_path / "ckpt") == path

    resumed_model = load(path)  # a plain HF directory: what vLLM or transformers would load
    resumed = make_trainer(resumed_model)
    state = checkpoint.load_state(path)
    resumed.load_state_dict(state["trainer"])
    checkpoint.set_rng_state(state["rng"])
    assert resumed.version == trainer.version == 2
    assert torch.equal(flat(resumed_model), flat(model))
    resumed_rng = torch.rand(3)

    # The optimizer moments, LR schedule (mid warm-up) and RNG came back too: the next step matches.
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), resumed_rng)
    trainer.train(samples)
    resumed.train(samples)
    assert resumed.version == trainer.version == 3
    assert torch.equal(flat(resumed_model), flat(model))


def test_latest_survives_a_second_save_and_prunes(tmp_path: Path) -> None:
    model = load(make_tiny_qwen3(tmp_path / "student", seed=1))
    trainer = make_trainer(model)
    for version in (1, 2, 3):
        trainer.version = version
        checkpoint.save(tmp_path / "ckpt", model, trainer.state_dict(), keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000002", "step-00000003"]
    latest = checkpoint.latest(tmp_path / "ckpt")
    assert latest is not None and latest.name == "step-00000003"
    assert checkpoint.load_state(latest)["trainer"]["version"] == 3


def _saved(tmp_path: Path, versions: tuple[int, ...], keep: int = 3) -> tuple[Qwen3ForCausalLM, Trainer, Path]:
    model = load(make_tiny_qwen3(tmp_path / "student", seed=1))
    trainer = make_trainer(model)
    for version in versions:
        trainer.version = version
        checkpoint.save(tmp_path / "ckpt", model, trainer.state_dict(), keep=keep)
    return model, trainer, tmp_path / "ckpt"


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    _, _, root = _saved(tmp_path, (1, 2))
    weights = root / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's bytes: still a loadable file
    weights.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointCorruptError, match=r"model\.safetensors"):
        checkpoint.verify(root / "step-00000002")
    latest = checkpoint.latest(root)
    assert latest is not None and latest.name == "step-00000001"
    assert checkpoint.load_state(latest)["trainer"]["version"] == 1


def test_latest_naming_a_missing_checkpoint_falls_back_and_none_when_nothing_verifies(tmp_path: Path) -> None:
    _, _, root = _saved(tmp_path, (1, 2))
    (root / "LATEST").write_text("step-00000009")
    latest = checkpoint.latest(root)
    assert latest is not None and latest.name == "step-00000002"
    for step in ("step-00000001", "step-00000002"):
        (root / step / "learner_state.pt").unlink()
    assert checkpoint.latest(root) is None
    assert checkpoint.latest(tmp_path / "never-written") is None


def test_short_space_prunes_old_checkpoints_first_then_refuses_without_writing(tmp_path: Path) -> None:
    model, trainer, root = _saved(tmp_path, (1, 2, 3), keep=3)
    one = sum(p.stat().st_size for p in (root / "step-00000003").rglob("*") if p.is_file())
    trainer.version = 4
    # room for one checkpoint once the two oldest are gone: they are pruned, then it is written
    path = checkpoint.save(root, model, trainer.state_dict(), keep=3, free_bytes=int(one * 0.05))
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert checkpoint.latest(root) == path
    # no room at all: the older one is pruned, never the newest; then refused with the sizes in the
    # message, nothing half-written, LATEST unchanged
    trainer.version = 5
    with pytest.raises(checkpoint.CheckpointSpaceError, match="MiB free"):
        checkpoint.save(root, model, trainer.state_dict(), keep=3, free_bytes=0)
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000004"]
    assert checkpoint.latest(root) == path


def test_every_file_and_the_directory_are_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    model = load(make_tiny_qwen3(tmp_path / "student", seed=1))
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        src = Path(src)
        if src.is_dir():
            files = [str(p) for p in src.rglob("*") if p.is_file()]
            assert files and set(files) <= set(synced), "a file was renamed into place before its fsync"
            assert str(src) in synced, "the checkpoint directory was not fsynced"
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = checkpoint.save(tmp_path / "ckpt", model, make_trainer(model).state_dict())
    assert str(tmp_path / "ckpt") in synced  # the parent, after the renames
    assert str(path / "learner_state.pt") not in synced  # recorded under its temporary name


class _Gadget:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while loading a checkpoint",))


def test_load_state_runs_no_pickled_code(tmp_path: Path) -> None:
    _, _, root = _saved(tmp_path, (1,))
    state = root / "step-00000001" / "learner_state.pt"
    torch.save({"trainer": {"version": 1}, "rng": _Gadget()}, state)
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        checkpoint.load_state(root / "step-00000001")
