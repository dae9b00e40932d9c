"""Supervised training of the shipped toy teacher and student (tiny Qwen3 models from scratch).

The teacher is trained until it solves the toy task well; the student is a smaller model with
a brief supervised start, so it is clearly worse and on-policy distillation has room to
improve it. Loss is next-token cross-entropy on response tokens (the answer and EOS) only.
Training is deterministic for a seed on one machine (torch.manual_seed, fixed data order).

This module knows the task, the tokenizer and the model configs; it knows nothing of the
services.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from asyncopd.evaluation.greedy import evaluate
from asyncopd.tasks import PromptItem
from asyncopd.tasks.toy import task as toy_task
from asyncopd.tasks.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

Role = Literal["teacher", "student"]
# Response tokens generated at most (25 characters + EOS, rounded up).
MAX_NEW_TOKENS = 32
METADATA_FILE = "asyncopd_toy.json"


def model_config(role: Role) -> Qwen3Config:
    """The architecture of each role; head_dim 32 because vLLM's CPU attention needs >= 32."""
    shapes = {
        "teacher": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "heads": 4},
        "student": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "heads": 2},
    }[role]
    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=shapes["hidden_size"],
        intermediate_size=shapes["intermediate_size"],
        num_hidden_layers=shapes["num_hidden_layers"],
        num_attention_heads=shapes["heads"],
        num_key_value_heads=shapes["heads"],
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )


@dataclass(frozen=True)
class TrainSettings:
    """One training run; the defaults per role are in `default_settings`."""

    role: Role
    seed: int = 0
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    train_size: int = 40000
    val_size: int = 256
    eval_every: int = 100
    # Stop early once validation accuracy reaches this (the student's "brief start").
    stop_accuracy: float | None = None
    max_minutes: float = 45.0


def default_settings(role: Role, **overrides: object) -> TrainSettings:
    base: dict[str, object] = (
        {"steps": 800, "eval_every": 100}
        if role == "teacher"
        else {"steps": 1500, "stop_accuracy": 0.3, "eval_every": 10}
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(role=role, **base)  # type: ignore[arg-type]


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, problems: list[toy_task.Problem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `labels` (-100 on prompt and padding) for all problems."""
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    responses = tokenizer([p.response for p in problems], add_special_tokens=False)["input_ids"]
    seqs = [pr + rs + [EOS_ID] for pr, rs in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return input_ids, labels


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    settings: TrainSettings,
    log: Callable[[str], None] = print,
    on_eval: Callable[[Qwen3ForCausalLM, dict], None] | None = None,
) -> tuple[Qwen3ForCausalLM, dict]:
    """Train one role from scratch; returns the model and a metadata dict (settings, history).

    `on_eval(model, metadata)` runs after every validation (e.g. to save the best checkpoint
    so far, so a long run leaves a usable model at any time)."""
    torch.manual_seed(settings.seed)
    tokenizer = build_tokenizer()
    # Validation problems come from the train split but are never trained on.
    drawn = toy_task.sample_problems("train", settings.train_size + settings.val_size, settings.seed)
    val_problems, train_problems = drawn[: settings.val_size], drawn[settings.val_size :]
    val_items = [
        PromptItem(prompt_id=str(i), prompt=p.prompt, answer=p.answer, grader="toy") for i, p in enumerate(val_problems)
    ]
    input_ids, labels = encode_examples(tokenizer, train_problems)
    attention_mask = (input_ids != PAD_ID).long()

    model = Qwen3ForCausalLM(model_config(settings.role))
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(train_problems), generator=generator)
    cursor = 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    stop_reason = "steps"
    for step in range(1, settings.steps + 1):
        if cursor + settings.batch_size > len(order):
            order = torch.randperm(len(train_problems), generator=generator)
            cursor = 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        width = int(attention_mask[idx].sum(dim=1).max())
        out = model(
            input_ids=input_ids[idx, :width], attention_mask=attention_mask[idx, :width], labels=labels[idx, :width]
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step % settings.eval_every == 0 or step == settings.steps:
            result = evaluate(model, tokenizer, val_items, MAX_NEW_TOKENS, batch_size=256)
            history.append({"step": step, "loss": out.loss.item(), "val_accuracy": result.accuracy, "s": elapsed})
            log(f"step {step} loss {out.loss.item():.4f} val_acc {result.accuracy:.3f} ({elapsed:.0f}s)")
            if on_eval is not None:
                on_eval(
                    model,
                    _metadata(settings, model=model, step=step, stop_reason="running", start=start, history=history),
                )
            if settings.stop_accuracy is not None and result.accuracy >= settings.stop_accuracy:
                stop_reason = "stop_accuracy"
                break
        if elapsed > settings.max_minutes * 60:
            stop_reason = "max_minutes"
            log(f"stopping at step {step}: time budget of {settings.max_minutes} min spent")
            break
    return model, _metadata(settings, model=model, step=step, stop_reason=stop_reason, start=start, history=history)


def _metadata(
    settings: TrainSettings,
    *,
    model: Qwen3ForCausalLM,
    step: int,
    stop_reason: str,
    start: float,
    history: list[dict[str, float]],
) -> dict:
    return {
        "settings": asdict(settings),
        "steps_done": step,
        "stop_reason": stop_reason,
        "seconds": round(time.perf_counter() - start, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "history": list(history),
    }


def save(model: Qwen3ForCausalLM, metadata: dict, out_dir: str | Path) -> Path:
    """Write a standard HF model directory (float32 safetensors, tokenizer, generation config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=MAX_NEW_TOKENS
    )
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("toy checkpoints are stored in float32; got a model with other dtypes")
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out
