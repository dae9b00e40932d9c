"""`asyncopd bench teacher`: prefill-only scoring throughput of the toy teacher.

Scores rollouts of toy prompts with random responses of a fixed length (scoring cost does not
depend on what the tokens are), with teacher top-K, tail mass and MC support, and prints
scored response tokens per second after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.records import Rollout, SupportKind, TaskInfo
from asyncopd.tasks import load_toy_dataset
from asyncopd.teacher.scorer import TeacherScorer


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default="assets/toy-teacher", help="teacher model directory")
    parser.add_argument("--rollouts", type=int, default=256, help="rollouts per score call")
    parser.add_argument("--response-tokens", type=int, default=48, help="response length of each rollout")
    parser.add_argument("--topk", type=int, default=8, help="teacher top-K per position")
    parser.add_argument("--support-k", type=int, default=8, help="MC support size scored per position (0 = none)")
    parser.add_argument("--max-batch-tokens", default="2048,8192", help="comma list of forward-pass token budgets")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per budget")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _rollouts(args: argparse.Namespace, vocab: int) -> list[Rollout]:
    tokenizer = load_tokenizer(args.teacher)
    rng = np.random.default_rng(0)
    out = []
    for i, item in enumerate(load_toy_dataset("test", args.rollouts, 0)):
        t = args.response_tokens
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


def run(args: argparse.Namespace) -> int:
    model = load_model(args.teacher)
    rollouts = _rollouts(args, int(model.config.vocab_size))
    results = []
    for budget in [int(b) for b in args.max_batch_tokens.split(",") if b]:
        scorer = TeacherScorer(model, "bench", max_batch_tokens=budget)
        scorer.score(rollouts[:8], args.topk, tail=args.topk > 0)  # warm-up
        seconds = 0.0
        for _ in range(args.repeats):
            t0 = time.monotonic()
            scorer.score(rollouts, args.topk, tail=args.topk > 0)
            seconds += time.monotonic() - t0
        tokens = args.repeats * sum(r.num_tokens for r in rollouts)
        results.append(
            {
                "max_batch_tokens": budget,
                "rollouts": len(rollouts),
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "scored_tokens_per_s": round(tokens / seconds, 1),
            }
        )
    if args.json:
        print(json.dumps({"benchmark": "teacher", "results": results}))
    else:
        print(f"{'max_batch_tokens':>17}{'rollouts':>10}{'tokens':>9}{'seconds':>9}{'scored tok/s':>14}")
        for r in results:
            print(
                f"{r['max_batch_tokens']:>17}{r['rollouts']:>10}{r['tokens']:>9}"
                f"{r['seconds']:>9.2f}{r['scored_tokens_per_s']:>14.1f}"
            )
    return 0
