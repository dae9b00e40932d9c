"""The FSDP2 learner on CPU (gloo): two processes make the same update as one on the same batch.

Each case spawns two ranks that build a Trainer with a `Lockstep`, train on the same samples
and write their results (losses, grad norms, metrics, the full weights after the update) for
the test to compare with a one-process Trainer built the same way, in fp32.
"""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner import checkpoint
from asyncopd.learner.distributed import Lockstep, Op, Rendezvous, follow, free_port, init, leave
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss
from asyncopd.records import ScoredSample
from asyncopd.weightsync.gather import GatheredWeights
from asyncopd.weightsync.manifest import Manifest, pack, plan
from asyncopd.weightsync.transport import Snapshot
from test_learner_step import generate, load, scored_samples
from tiny_models import make_tiny_qwen3

pytestmark = pytest.mark.service

SETTINGS: dict[str, Any] = {"lr": 1e-2, "micro_batch_size": 3, "mini_batches": 2, "grad_clip": 0.5}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    # three layers: more than one FSDP layer group, plus the root (embeddings, norm, tied head)
    student = make_tiny_qwen3(root / "student", seed=1, layers=3)
    return student, make_tiny_qwen3(root / "teacher", seed=2, scale=4.0)


def trainer(model_dir: Path, kind: str, options: dict[str, Any], lockstep: Lockstep | None) -> Trainer:
    return Trainer(load(model_dir), OPDLoss(kind, **options), lockstep=lockstep, **SETTINGS)  # type: ignore[arg-type]


def result(t: Trainer, stats: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {
        "losses": [s.metrics["loss"] for s in stats],
        "grad_norms": [s.grad_norm for s in stats],
        "metrics": [s.metrics for s in stats],
        "weights": {k: v.clone() for k, v in full.items()},
    }


def rank_main(rank: int, port: int, job: tuple[Path, Path, str, dict[str, Any], Path]) -> None:
    model_dir, samples_file, kind, options, out = job
    init(Rendezvous(rank, 2, "127.0.0.1", port), "cpu")
    torch.manual_seed(0)
    samples: list[ScoredSample] = pickle.loads(samples_file.read_bytes())
    lockstep = Lockstep(rank, 2)
    t = trainer(model_dir, kind, options, lockstep)
    if rank == 0:  # rank 0 trains (and tells rank 1 the samples), as the learner service does
        stats = t.train(samples)
        lockstep.lead(Op.STOP)
    else:
        follow(lockstep, {Op.TRAIN: t.train})
    res = result(t, stats if rank == 0 else [])
    if rank == 0:
        torch.save(res, out)
    leave()


def two_ranks(target: Any, *args: Any, timeout: float = 120) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.parametrize(
    ("kind", "options"),
    [("forward_kl_topk", {"tail": "bucket"}), ("reverse_kl_mc", {"correction": "decoupled"})],
    ids=str,
)
def test_two_fsdp_ranks_make_the_one_process_update(
    models: tuple[Path, Path], tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    # 11 samples, 2 mini-batches of 5 and 6 rows, micro-batches of 3: 2 per step, so one rank
    # gets a real micro-batch in each round and the odd rounds need no dummy; 5 rows -> 2
    # micro-batches as well (3 + 2); the decoupled case adds the proximal pass
    samples = scored_samples(generate(load(models[0]), load(models[1]), n=11), kind)
    samples_file = tmp_path / "samples.pkl"
    samples_file.write_bytes(pickle.dumps(samples))
    out = tmp_path / "rank0.pt"
    two_ranks(rank_main, (models[0], samples_file, kind, options, out))
    sharded = torch.load(out, weights_only=False)

    one = trainer(models[0], kind, options, None)
    before = {k: v.clone() for k, v in one.model.state_dict().items()}
    stats = one.train(samples)
    single = result(one, stats)

    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert sharded["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)
    for got, want in zip(sharded["metrics"], single["metrics"], strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    assert sharded["weights"].keys() == single["weights"].keys()
    moved = 0.0
    for name, want in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], want, rtol=1e-5, atol=1e-5)
        moved = max(moved, float((want - before[name]).abs().max()))
    assert moved > 1e-3  # the update did change the weights: the comparison means something


def split(samples: list[ScoredSample]) -> tuple[list[ScoredSample], list[ScoredSample]]:
    return samples[:6], samples[6:]


def checkpoint_rank_main(rank: int, port: int, job: tuple[Path, Path, Path, Path]) -> None:
    """Train on the first half, checkpoint (every rank), train on the second half; rank 0 writes the result."""
    model_dir, samples_file, ckpt_dir, out = job
    init(Rendezvous(rank, 2, "127.0.0.1", port), "cpu")
    first, second = split(pickle.loads(samples_file.read_bytes()))
    lockstep = Lockstep(rank, 2)
    t = trainer(model_dir, "reverse_kl_mc", {"correction": "is"}, lockstep)
    if rank == 0:
        t.train(first)
        lockstep.lead(Op.STOP)
    else:
        follow(lockstep, {Op.TRAIN: t.train})
    state = {k: v for k, v in t.state_dict().items() if k != "optimizer"}
    checkpoint.save_sharded(ckpt_dir, t.model, t.optimizer, state, rank=rank, world_size=2)  # type: ignore[arg-type]
    if rank == 0:
        stats = t.train(second)
        lockstep.lead(Op.STOP)
    else:
        follow(lockstep, {Op.TRAIN: t.train})
    res = result(t, stats if rank == 0 else [])
    if rank == 0:
        torch.save(res, out)
    leave()


def test_a_two_rank_checkpoint_resumes_in_one_process(models: tuple[Path, Path], tmp_path: Path) -> None:
    samples = scored_samples(generate(load(models[0]), load(models[1]), n=12), "reverse_kl_mc")
    samples_file = tmp_path / "samples.pkl"
    samples_file.write_bytes(pickle.dumps(samples))
    ckpt_dir, out = tmp_path / "ckpt", tmp_path / "rank0.pt"
    two_ranks(checkpoint_rank_main, (models[0], samples_file, ckpt_dir, out))
    continued = torch.load(out, weights_only=False)

    path = checkpoint.latest(ckpt_dir)
    assert path is not None and checkpoint.is_sharded(path)
    assert path.name == "step-00000002"
    # the HF copy (evaluation, serving) holds the weights the shards hold
    exported = load(path).state_dict()
    # one process, no process group: weights and AdamW moments from the shards, version and LR schedule
    one = trainer(models[0], "reverse_kl_mc", {"correction": "is"}, None)
    fresh = {k: v.clone() for k, v in one.model.state_dict().items()}
    checkpoint.load_sharded(path, one.model, one.optimizer)
    one.load_state_dict(checkpoint.load_state(path)["trainer"])
    assert one.version == 2
    assert any(not torch.equal(fresh[k], v) for k, v in one.model.state_dict().items())
    for name, tensor in one.model.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    stats = one.train(split(samples)[1])
    resumed = result(one, stats)
    assert resumed["losses"] == pytest.approx(continued["losses"], rel=1e-5, abs=1e-6)
    for name, want in continued["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], want, rtol=1e-5, atol=1e-5)
    # a corrupted shard is caught by the digests, as for one-process checkpoints
    shard = next((path / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointCorruptError):
        checkpoint.verify(path)


def gather_rank_main(rank: int, port: int, job: tuple[Path, Path]) -> None:
    """Pack a bf16 snapshot from the sharded weights (rank 1 joins the gathers); rank 0 writes it."""
    model_dir, out = job
    init(Rendezvous(rank, 2, "127.0.0.1", port), "cpu")
    lockstep = Lockstep(rank, 2)
    t = Trainer(load(model_dir), OPDLoss("forward_kl_topk"), lr=1e-2, lockstep=lockstep, sync_dtype=torch.bfloat16)
    if rank == 0:
        config = WeightSyncConfig(bucket_mb=0.02)  # ~20 KiB buckets: several
        snapshot = Snapshot.take(1, t.named_weights(), None, config, torch.device("cpu"))
        again = Snapshot.take(2, t.named_weights(), snapshot, config, torch.device("cpu"))  # reused layout
        lockstep.lead(Op.STOP)
        torch.save({"manifest": snapshot.manifest.to_json(), "buckets": snapshot.buckets, "again": again.buckets}, out)
    else:
        follow(lockstep, {Op.GATHER: lambda _: t.named_weights().gather_only()})
    leave()


def test_sync_gathers_sharded_weights_per_bucket_in_bf16(models: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "snapshot.pt"
    two_ranks(gather_rank_main, (models[0], out))
    saved = torch.load(out, weights_only=False)
    manifest = Manifest.from_json(saved["manifest"])
    assert len(manifest.bucket_sizes) > 2
    full = load(models[0]).state_dict()
    names = [t.name for t in manifest.tensors]
    # the tied LM head is the embedding: sent once
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert sorted(names) == sorted(k for k in full if k != "lm_head.weight")
    for name, tensor in manifest.unpack(saved["buckets"]):
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, full[name].to(torch.bfloat16), rtol=0, atol=0)
    for a, b in zip(saved["buckets"], saved["again"], strict=True):
        assert torch.equal(a, b)


def test_unsharded_weights_pack_the_same_as_before(models: tuple[Path, Path]) -> None:
    """One process: GatheredWeights packs what `pack` packs of the cast state dict, tied once."""
    model = load(models[0])
    weights = GatheredWeights(list(model.state_dict(keep_vars=True).items()), torch.bfloat16)
    expected = [(n, t.to(torch.bfloat16)) for n, t in model.state_dict().items() if n != "lm_head.weight"]
    manifest = plan(weights.specs(), 4096)
    assert manifest == plan(expected, 4096)
    for a, b in zip(weights.pack(manifest, "cpu"), pack(expected, manifest, "cpu"), strict=True):
        assert torch.equal(a, b)
    assert [n for n, _ in weights] == [n for n, _ in expected]


def resume_rank_main(rank: int, port: int, job: tuple[Path, Path, Path]) -> None:
    """Two ranks resume a one-process checkpoint and train on the second half; rank 0 writes the result."""
    ckpt, samples_file, out = job
    init(Rendezvous(rank, 2, "127.0.0.1", port), "cpu")
    second = split(pickle.loads(samples_file.read_bytes()))[1]
    lockstep = Lockstep(rank, 2)
    t = trainer(ckpt, "reverse_kl_mc", {"correction": "is"}, lockstep)
    state = checkpoint.load_state(ckpt)["trainer"]
    checkpoint.load_optimizer_by_position(t.model, t.optimizer, state.pop("optimizer"))
    t.load_state_dict(state)
    if rank == 0:
        stats = t.train(second)
        lockstep.lead(Op.STOP)
    else:
        follow(lockstep, {Op.TRAIN: t.train})
    res = result(t, stats if rank == 0 else [])
    if rank == 0:
        torch.save({**res, "version": t.version}, out)
    leave()


def test_a_one_process_checkpoint_resumes_on_two_ranks(models: tuple[Path, Path], tmp_path: Path) -> None:
    samples = scored_samples(generate(load(models[0]), load(models[1]), n=12), "reverse_kl_mc")
    first, second = split(samples)
    one = trainer(models[0], "reverse_kl_mc", {"correction": "is"}, None)
    one.train(first)
    path = checkpoint.save(tmp_path / "ckpt", one.model, one.state_dict())  # type: ignore[arg-type]
    continued = result(one, one.train(second))
    samples_file, out = tmp_path / "samples.pkl", tmp_path / "rank0.pt"
    samples_file.write_bytes(pickle.dumps(samples))
    two_ranks(resume_rank_main, (path, samples_file, out))
    resumed = torch.load(out, weights_only=False)
    assert resumed["version"] == 4
    assert resumed["losses"] == pytest.approx(continued["losses"], rel=1e-5, abs=1e-6)
    for name, want in continued["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], want, rtol=1e-5, atol=1e-5)
