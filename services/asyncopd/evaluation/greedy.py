"""Greedy evaluation of a causal LM on a prompt dataset: batched generation, then grading.

Generation uses plain transformers (`generate` with a KV cache, left padding, greedy), so it
runs anywhere the model loads; it is the reference the rollout engines are checked against,
not a throughput path. This module knows models, tokenizers and graders; it knows nothing of
services, Redis or gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asyncopd.tasks import PromptItem, get_grader


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one model on one dataset, and what it answered."""

    accuracy: float
    n: int
    correct: int
    seconds: float
    responses: list[str] = field(repr=False)
    scores: list[float] = field(repr=False)

    def summary(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "n": self.n, "correct": self.correct, "seconds": self.seconds}


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of `prompts` (decoded, special tokens dropped, cut at EOS)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set one (e.g. pad = eos) before batched generation")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos token; generation would never stop before max_new_tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    # Left padding keeps every prompt's last token at the same position, which `generate` needs.
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :].tolist()
            for ids in new_tokens:
                kept = ids[: ids.index(eos_id)] if eos_id in ids else ids
                text = tokenizer.decode(kept, skip_special_tokens=True)
                out.append(text if isinstance(text, str) else "".join(text))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[PromptItem],
    max_new_tokens: int,
    batch_size: int = 64,
) -> EvalResult:
    """Greedy-generate a response to every item and grade it with the item's grader."""
    if not items:
        raise ValueError("cannot evaluate on an empty dataset")
    start = time.perf_counter()
    responses = generate_greedy(model, tokenizer, [it.prompt for it in items], max_new_tokens, batch_size)
    scores = [get_grader(it.grader).score(resp, it.answer) for it, resp in zip(items, responses, strict=True)]
    correct = sum(1 for s in scores if s >= 1.0)
    return EvalResult(
        accuracy=correct / len(items),
        n=len(items),
        correct=correct,
        seconds=time.perf_counter() - start,
        responses=responses,
        scores=scores,
    )
