"""`asyncopd eval`: greedy accuracy of a model on the toy task or a GSM8K-style file."""

from __future__ import annotations

import argparse
import json
from typing import Any

from asyncopd.config.model import TaskConfig

# Longest response per task when --max-new-tokens is not given.
_DEFAULT_MAX_NEW_TOKENS = {"toy": 32, "jsonl": 256, "parquet": 256}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="greedy accuracy of a model on a task",
        description="Greedy-generate an answer to each prompt and report the fraction graded correct.",
    )
    parser.add_argument("--model", required=True, help="HF model directory or hub name")
    parser.add_argument("--task", choices=["toy", "jsonl", "parquet"], default="toy", help="task (default toy)")
    parser.add_argument("--data", help="dataset file for --task jsonl/parquet (fields: question, answer)")
    parser.add_argument("--prompt-template", default="{question}", help="file tasks: prompt built from a record")
    parser.add_argument("--split", choices=["train", "test"], default="test", help="toy split (default test)")
    parser.add_argument("--n", type=int, default=500, help="number of prompts (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="toy task seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, help="response length limit (default: toy 32, files 256)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--show", type=int, default=0, help="print the first N prompts and responses")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asyncopd.evaluation.greedy import evaluate
    from asyncopd.models.loading import load_model, load_tokenizer
    from asyncopd.tasks import load_file_dataset, load_toy_dataset

    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    if args.task == "toy":
        dataset = load_toy_dataset(args.split, args.n, args.seed)
    else:
        if not args.data:
            raise SystemExit(f"--task {args.task} needs --data FILE")
        TaskConfig(name=args.task, path=args.data, prompt_template=args.prompt_template)  # validates
        dataset = load_file_dataset(args.data, args.prompt_template).head(args.n)
    max_new_tokens = args.max_new_tokens or _DEFAULT_MAX_NEW_TOKENS[args.task]
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device)
    result = evaluate(model, tokenizer, list(dataset), max_new_tokens, args.batch_size)
    if args.json:
        print(json.dumps({**result.summary(), "model": args.model, "task": args.task}))
    else:
        print(f"{args.model} on {dataset.name}: accuracy {result.accuracy:.3f} ({result.correct}/{result.n})")
    for item, response in list(zip(dataset, result.responses, strict=True))[: args.show]:
        print(f"{item.prompt!r} -> {response!r} (answer {item.answer})")
    return 0
