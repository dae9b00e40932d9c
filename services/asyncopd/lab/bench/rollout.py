"""`asyncopd bench rollout`: generation throughput of the rollout engines on the toy student.

For each engine (transformers, vllm) and each support kind (none, student top-K, MC draws) it
times `generate` on a batch of toy prompts after one warm-up call, and prints response tokens
per second. The MC row of the vllm engine shows the cost of full-vocabulary log-probs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from asyncopd.models.files import resolve_model_path
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.records import Prompt, SupportKind, TaskInfo
from asyncopd.rollout.engine import Engine
from asyncopd.rollout.sampling import Sampling
from asyncopd.tasks import load_toy_dataset

_KINDS = {"none": SupportKind.NONE, "topk": SupportKind.STUDENT_TOPK, "mc": SupportKind.MC_SAMPLES}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", default="assets/toy-student", help="student model directory")
    parser.add_argument("--engines", default="transformers,vllm", help="comma list: transformers, vllm")
    parser.add_argument("--support", default="none,topk,mc", help="comma list: none, topk, mc")
    parser.add_argument("--k", type=int, default=8, help="K (top-k) or N (MC samples)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--max-tokens", type=int, default=64, help="max response tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per configuration")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _engine(name: str, student: str) -> Engine:
    if name == "transformers":
        from asyncopd.rollout.transformers_engine import TransformersEngine

        return TransformersEngine(load_model(student), load_tokenizer(student), "bench")
    if name == "vllm":
        from asyncopd.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(resolve_model_path(student), "bench")
    raise ValueError(f"--engines: unknown engine {name!r} (transformers, vllm)")


def run(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.student)
    items = load_toy_dataset("test", args.prompts, 0)
    prompts = [
        Prompt(it.prompt_id, np.asarray(tokenizer.encode(it.prompt), dtype=np.int32), TaskInfo("toy", it.answer))
        for it in items
    ]
    results = []
    for engine_name in [e for e in args.engines.split(",") if e]:
        start = time.monotonic()
        engine = _engine(engine_name, args.student)
        startup = time.monotonic() - start
        # No stop string: every response runs to EOS or max_tokens, as in training rollouts.
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=1)
        engine.generate(prompts[:4], sampling, SupportKind.NONE, 0)  # warm-up
        for kind_name in [k for k in args.support.split(",") if k]:
            kind = _KINDS[kind_name]
            tokens, seconds = 0, 0.0
            for _ in range(args.repeats):
                t0 = time.monotonic()
                rollouts = engine.generate(prompts, sampling, kind, args.k if kind != SupportKind.NONE else 0)
                seconds += time.monotonic() - t0
                tokens += sum(r.num_tokens for r in rollouts)
            results.append(
                {
                    "engine": engine_name,
                    "support": kind_name,
                    "k": args.k if kind != SupportKind.NONE else 0,
                    "prompts": len(prompts),
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(tokens / seconds, 1),
                    "startup_s": round(startup, 1),
                }
            )
        engine.close()
    if args.json:
        print(json.dumps({"benchmark": "rollout", "results": results}))
    else:
        print(
            f"{'engine':<13}{'support':<8}{'k':>3}{'prompts':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>10}{'start s':>9}"
        )
        for r in results:
            print(
                f"{r['engine']:<13}{r['support']:<8}{r['k']:>3}{r['prompts']:>9}{r['tokens']:>8}"
                f"{r['seconds']:>9.2f}{r['tokens_per_s']:>10.1f}{r['startup_s']:>9.1f}"
            )
    return 0
