"""`asyncopd bench rollout`: generation throughput of the rollout engines on the toy student.

For each engine (transformers, vllm) and each support kind (none, student top-K, MC draws) it
times `generate` on a batch of toy prompts after one warm-up call, and prints response tokens
per second, each kind's tok/s as a ratio to `none` (the cost of recording the support), and for
the vllm engine the bytes per generated token the engine hands to the host (ids + log μ; the
support is drawn inside the engine). `--student random:V` generates with a tiny random Qwen3
(hidden 64, one layer) whose vocabulary has V rows, e.g. random:151936 for Qwen3's: the costs
that grow with the vocabulary, without a real model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asyncopd.models.files import resolve_model_path
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.records import Prompt, SupportKind, TaskInfo
from asyncopd.rollout.engine import Engine
from asyncopd.rollout.sampling import Sampling
from asyncopd.tasks import load_toy_dataset

_KINDS = {"none": SupportKind.NONE, "topk": SupportKind.STUDENT_TOPK, "mc": SupportKind.MC_SAMPLES}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--student", default="assets/toy-student", help="student model directory, or random:V (tiny random Qwen3)"
    )
    parser.add_argument("--engines", default="transformers,vllm", help="comma list: transformers, vllm")
    parser.add_argument("--support", default="none,topk,mc", help="comma list: none, topk, mc")
    parser.add_argument("--k", type=int, default=8, help="K (top-k) or N (MC samples)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--max-tokens", type=int, default=64, help="max response tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per configuration")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _random_student(vocab: int, directory: Path) -> str:
    """Save a tiny random Qwen3 with `vocab` rows and the toy tokenizer (prompts use its ids)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from asyncopd.tasks.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM-CPU's attention needs a head size it supports
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)  # spread-out but not uniform next-token distributions
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _engine(name: str, student: str, max_model_len: int) -> Engine:
    if name == "transformers":
        from asyncopd.rollout.transformers_engine import TransformersEngine

        return TransformersEngine(load_model(student), load_tokenizer(student), "bench")
    if name == "vllm":
        from asyncopd.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(resolve_model_path(student), "bench", max_model_len=max_model_len)
    raise ValueError(f"--engines: unknown engine {name!r} (transformers, vllm)")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="asyncopd-bench-") as tmp:
        if args.student.startswith("random:"):
            args.student = _random_student(int(args.student.split(":", 1)[1]), Path(tmp))
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.student)
    items = load_toy_dataset("test", args.prompts, 0)
    prompts = [
        Prompt(it.prompt_id, np.asarray(tokenizer.encode(it.prompt), dtype=np.int32), TaskInfo("toy", it.answer))
        for it in items
    ]
    results = []
    for engine_name in [e for e in args.engines.split(",") if e]:
        start = time.monotonic()
        max_len = max(len(p.prompt_ids) for p in prompts) + args.max_tokens + 1
        engine = _engine(engine_name, args.student, max_len)
        startup = time.monotonic() - start
        # No stop string: every response runs to EOS or max_tokens, as in training rollouts.
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=1)
        engine.generate(prompts[:4], sampling, SupportKind.NONE, 0)  # warm-up
        for kind_name in [k for k in args.support.split(",") if k]:
            kind = _KINDS[kind_name]
            tokens, seconds = 0, 0.0
            host_before = getattr(engine, "host_bytes", None)
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
                    "host_bytes_per_token": (
                        None if host_before is None else round((engine.host_bytes - host_before) / tokens, 1)  # type: ignore[attr-defined]
                    ),
                }
            )
        base = next((r["tokens_per_s"] for r in results if r["engine"] == engine_name and r["support"] == "none"), None)
        for r in results:
            if r["engine"] == engine_name:
                r["vs_none"] = None if not base else round(r["tokens_per_s"] / base, 3)
        engine.close()
    if args.json:
        print(json.dumps({"benchmark": "rollout", "results": results}))
    else:
        print(
            f"{'engine':<13}{'support':<8}{'k':>4}{'prompts':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>10}"
            f"{'vs none':>9}{'host B/tok':>11}{'start s':>9}"
        )
        for r in results:
            ratio = "-" if r["vs_none"] is None else f"{r['vs_none']:.3f}"
            host = "-" if r["host_bytes_per_token"] is None else f"{r['host_bytes_per_token']:.0f}"
            print(
                f"{r['engine']:<13}{r['support']:<8}{r['k']:>4}{r['prompts']:>9}{r['tokens']:>8}"
                f"{r['seconds']:>9.2f}{r['tokens_per_s']:>10.1f}{ratio:>9}{host:>11}{r['startup_s']:>9.1f}"
            )
    return 0
