"""`asyncopd bench teacher`: prefill-only scoring throughput and peak memory of the teacher.

Scores rollouts of toy prompts with random responses of a fixed length (scoring cost does not
depend on what the tokens are), with teacher top-K, tail mass and MC support, and prints
scored response tokens per second after one warm-up call.

`--memory-tokens T` also scores one rollout of T response tokens and prints the scorer's peak
extra memory (above what was resident before the call) as a ratio to one [T, V] fp32 tensor,
for the default chunk size and for one chunk holding every position (what an unchunked scorer
allocates at least). On CPU the peak is the process's resident high-water mark, reset
(/proc/self/clear_refs) before the call; on a GPU, torch's peak allocated memory.
`--teacher random:V` scores with a tiny random Qwen3 (hidden 64, one layer) whose vocabulary
has V rows, e.g. random:151936 for Qwen3's: the costs that grow with V without a real teacher.

`--backend torch,vllm` times both scoring backends on the same rollouts (the vLLM backend gets
the model saved to a temporary directory, `--vllm-dtype`, eager mode) and prints the ratio of
their scored tokens/s per budget.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.records import Rollout, SupportKind, TaskInfo
from asyncopd.tasks import load_toy_dataset
from asyncopd.teacher.scorer import TeacherScorer


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher", default="assets/toy-teacher", help="teacher model directory, or random:V (tiny random Qwen3)"
    )
    parser.add_argument("--rollouts", type=int, default=256, help="rollouts per score call")
    parser.add_argument("--response-tokens", type=int, default=48, help="response length of each rollout")
    parser.add_argument("--topk", type=int, default=8, help="teacher top-K per position")
    parser.add_argument("--support-k", type=int, default=8, help="MC support size scored per position (0 = none)")
    parser.add_argument("--max-batch-tokens", default="2048,8192", help="comma list of forward-pass token budgets")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per budget")
    parser.add_argument(
        "--memory-tokens", type=int, default=0, help="also measure peak memory scoring one rollout of T tokens"
    )
    parser.add_argument("--backend", default="torch", help="comma list of scoring backends: torch, vllm")
    parser.add_argument("--vllm-dtype", default="float32", help="dtype of the vLLM teacher engine")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _model(spec: str) -> Any:
    if not spec.startswith("random:"):
        return load_model(spec)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=int(spec.split(":", 1)[1]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1 << 16,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def _rollouts(
    args: argparse.Namespace, vocab: int, count: int | None = None, length: int | None = None
) -> list[Rollout]:
    tokenizer = load_tokenizer("assets/toy-teacher" if args.teacher.startswith("random:") else args.teacher)
    rng = np.random.default_rng(0)
    out = []
    for i, item in enumerate(load_toy_dataset("test", count or args.rollouts, 0)):
        t = length or args.response_tokens
        response = rng.integers(4, vocab, t).astype(np.int32)
        support = None
        if args.support_k:
            support = rng.integers(0, vocab, (t, args.support_k)).astype(np.int32)
            support[:, 0] = response
        out.append(
            Rollout(
                sample_id=f"bench-{i}",
                prompt_id=item.prompt_id,
                ticket="",
                task=TaskInfo("toy", item.answer),
                prompt_ids=np.asarray(tokenizer.encode(item.prompt), dtype=np.int32),
                response_ids=response,
                behavior_logprobs=np.zeros(t, dtype=np.float32),
                versions=np.zeros(t, dtype=np.int32),
                support_kind=SupportKind.MC_SAMPLES if support is not None else SupportKind.NONE,
                support_ids=support,
                support_logprobs=None if support is None else np.zeros(support.shape, dtype=np.float32),
            )
        )
    return out


def _resident_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _peak_extra_bytes(scorer: TeacherScorer, rollouts: list[Rollout], topk: int, device: torch.device) -> int:
    """Peak memory above the level before the call, while scoring `rollouts` once."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        scorer.score(rollouts, topk, tail=topk > 0)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark VmHWM to VmRSS
    before = _resident_bytes("VmRSS")
    scorer.score(rollouts, topk, tail=topk > 0)
    return max(0, _resident_bytes("VmHWM") - before)


def _memory(args: argparse.Namespace, model: Any, budget: int) -> list[dict[str, Any]]:
    vocab = int(model.config.vocab_size)
    t = args.memory_tokens
    (rollout,) = _rollouts(args, vocab, count=1, length=t)
    device = next(model.parameters()).device
    one_tensor = t * vocab * 4
    out = []
    for label, chunk in (("chunked", None), ("one chunk", t * vocab)):
        scorer = TeacherScorer(model, "bench", max_batch_tokens=budget, chunk_elements=chunk)
        scorer.score([rollout], args.topk, tail=args.topk > 0)  # warm-up: allocator and thread pools settle
        peak = _peak_extra_bytes(scorer, [rollout], args.topk, device)
        out.append(
            {
                "scorer": label,
                "tokens": t,
                "vocab": vocab,
                "peak_extra_mb": round(peak / 2**20, 1),
                "tv_fp32_mb": round(one_tensor / 2**20, 1),
                "ratio": round(peak / one_tensor, 4),
            }
        )
    return out


def _vllm_scorer(args: argparse.Namespace, model: Any, budget: int, rollouts: list[Rollout]) -> Any:
    import tempfile

    from asyncopd.teacher.vllm_scorer import VLLMTeacherScorer

    if args.teacher.startswith("random:"):
        directory = tempfile.mkdtemp(prefix="bench-teacher-")
        model.save_pretrained(directory)
        load_tokenizer("assets/toy-teacher").save_pretrained(directory)
    else:
        directory = args.teacher
    longest = max(len(r.prompt_ids) + r.num_tokens for r in rollouts)
    return VLLMTeacherScorer(
        directory,
        "bench",
        dtype=args.vllm_dtype,
        max_model_len=max(longest + 1, args.memory_tokens + 64),
        max_batch_tokens=budget,
        enforce_eager=not torch.cuda.is_available(),
    )


def run(args: argparse.Namespace) -> int:
    model = _model(args.teacher)
    rollouts = _rollouts(args, int(model.config.vocab_size))
    results = []
    backends = [b for b in args.backend.split(",") if b]
    for backend in backends:
        if backend not in ("torch", "vllm"):
            raise SystemExit(f"--backend: unknown backend {backend!r} (torch, vllm)")
    for backend in backends:
        for budget in [int(b) for b in args.max_batch_tokens.split(",") if b]:
            if backend == "vllm":
                scorer: Any = _vllm_scorer(args, model, budget, rollouts)
            else:
                scorer = TeacherScorer(model, "bench", max_batch_tokens=budget)
            scorer.score(rollouts[:8], args.topk, tail=args.topk > 0)  # warm-up
            seconds = 0.0
            for _ in range(args.repeats):
                t0 = time.monotonic()
                scorer.score(rollouts, args.topk, tail=args.topk > 0)
                seconds += time.monotonic() - t0
            if backend == "vllm":
                scorer.close()
            tokens = args.repeats * sum(r.num_tokens for r in rollouts)
            results.append(
                {
                    "backend": backend,
                    "max_batch_tokens": budget,
                    "rollouts": len(rollouts),
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "scored_tokens_per_s": round(tokens / seconds, 1),
                }
            )
    ratios: dict[str, float] = {}
    for r in results:
        if r["backend"] == "vllm":
            base = next(
                (t for t in results if t["backend"] == "torch" and t["max_batch_tokens"] == r["max_batch_tokens"]), None
            )
            if base is not None:
                ratios[str(r["max_batch_tokens"])] = round(r["scored_tokens_per_s"] / base["scored_tokens_per_s"], 3)
    budgets = [int(b) for b in args.max_batch_tokens.split(",") if b]
    memory = _memory(args, model, max(budgets)) if args.memory_tokens else []
    if args.json:
        print(json.dumps({"benchmark": "teacher", "results": results, "vllm_vs_torch": ratios, "memory": memory}))
    else:
        print(f"{'backend':>8}{'max_batch_tokens':>17}{'rollouts':>10}{'tokens':>9}{'seconds':>9}{'scored tok/s':>14}")
        for r in results:
            print(
                f"{r['backend']:>8}{r['max_batch_tokens']:>17}{r['rollouts']:>10}{r['tokens']:>9}"
                f"{r['seconds']:>9.2f}{r['scored_tokens_per_s']:>14.1f}"
            )
        for label, ratio in ratios.items():
            print(f"vllm / torch scored tok/s at max_batch_tokens {label}: {ratio}")
        for m in memory:
            print(
                f"peak memory ({m['scorer']}): {m['peak_extra_mb']} MB for {m['tokens']} tokens at V={m['vocab']} "
                f"= {m['ratio']} x one [T, V] fp32 tensor ({m['tv_fp32_mb']} MB)"
            )
    return 0
