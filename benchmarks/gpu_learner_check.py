"""GPU check of the learner: every estimator's update on CUDA, and step time at Qwen3 vocab size.

Run on a CUDA machine from the repository root (after `make proto`):
    PYTHONPATH=services:tests/service python benchmarks/gpu_learner_check.py
Prints one line per case: KL before/after 5 steps on CUDA (must fall), and, for a random
Qwen3-shaped model with the real 151,669-token vocabulary, the time of one optimizer step.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss
from test_learner_step import CASES, dense_kl, generate, load, scored_samples
from tiny_models import make_tiny_qwen3
from transformers import Qwen3Config, Qwen3ForCausalLM


def estimator_cases(device: torch.device) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sp = make_tiny_qwen3(Path(tmp) / "s", seed=1)
        tp = make_tiny_qwen3(Path(tmp) / "t", seed=2, scale=4.0)
        gen = generate(load(sp), load(tp), n=16)
        for kind, options, mini in CASES:
            student, teacher = load(sp), load(tp)
            samples = scored_samples(gen, kind)
            forward = kind.startswith("forward")
            before = dense_kl(student, teacher, samples, forward)
            student.to(device)
            teacher.to(device)
            trainer = Trainer(
                student,
                OPDLoss(kind, **options),  # type: ignore[arg-type]
                lr=5e-3,
                micro_batch_size=6,
                mini_batches=mini,
                device=device,
                teacher=teacher if kind.endswith("_full") else None,
            )
            t0 = time.perf_counter()
            for _ in range(5):
                trainer.train(samples)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            after = dense_kl(student.cpu(), teacher.cpu(), samples, forward)
            rows.append(
                {
                    "kind": kind,
                    **options,
                    "kl_before": before,
                    "kl_after": after,
                    "ok": after < 0.9 * before,
                    "seconds_5_steps": round(elapsed, 3),
                }
            )
    return rows


def qwen_vocab_step(device: torch.device) -> dict[str, object]:
    """One reverse_kl_mc step (N=64) on a 2-layer random Qwen3 with the real vocabulary."""
    import numpy as np
    from asyncopd.records import Rollout, ScoredSample, SupportKind, TaskInfo, TeacherScores

    cfg = Qwen3Config(
        vocab_size=151_669,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    b, p, t, n = 8, 64, 512, 64
    rng = np.random.default_rng(0)
    samples = []
    for i in range(b):
        resp = rng.integers(10, 151_000, t).astype(np.int32)
        sup = np.concatenate([resp[:, None], rng.integers(10, 151_000, (t, n - 1))], 1).astype(np.int32)
        r = Rollout(
            f"s{i}",
            f"p{i}",
            "",
            TaskInfo("toy", "0"),
            rng.integers(10, 151_000, p).astype(np.int32),
            resp,
            np.full(t, -2.0, np.float32),
            np.zeros(t, np.int32),
            SupportKind.MC_SAMPLES,
            sup,
            np.full((t, n), -12.0, np.float32),
        )
        s = TeacherScores(f"s{i}", np.full(t, -2.5, np.float32), support_logprobs=np.full((t, n), -12.5, np.float32))
        samples.append(ScoredSample(r, s))
    trainer = Trainer(model, OPDLoss("reverse_kl_mc"), lr=1e-5, micro_batch_size=4, device=device)
    trainer.train(samples)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):
        trainer.train(samples)
    torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / 3
    return {
        "case": "qwen3-vocab 2-layer bf16, reverse_kl_mc N=64",
        "tokens_per_step": b * t,
        "seconds_per_step": round(step, 4),
        "train_tokens_per_s": round(b * t / step),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__}))
    rows = estimator_cases(device)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps(qwen_vocab_step(device)))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
