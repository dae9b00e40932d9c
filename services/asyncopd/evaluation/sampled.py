"""Sampled evaluation: n responses per prompt, graded, summarized as Avg@n and pass@k.

Avg@n is the mean over prompts of the fraction of a prompt's n responses graded correct (the
expected accuracy of one sample); pass@k is the unbiased estimate of the chance that at least
one of k responses drawn from the n is correct, 1 - C(n-c, k) / C(n, k) per prompt (Chen et
al., 2021), averaged over prompts. Generation is plain transformers sampling (batched, left
padded), the reference path that runs wherever the model loads. It knows models, tokenizers
and graders; nothing of services.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asyncopd.tasks import PromptItem, get_grader


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `correct` of `n` samples right (k <= n)."""
    if not 1 <= k <= n or not 0 <= correct <= n:
        raise ValueError(f"need 1 <= k <= n and 0 <= correct <= n (n={n}, correct={correct}, k={k})")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


@dataclass(frozen=True)
class SampledResult:
    """Avg@n and pass@k of one model on one prompt set."""

    n: int
    prompts: int
    avg_at_n: float
    pass_at: dict[int, float]
    seconds: float

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {f"avg@{self.n}": self.avg_at_n, "n": self.n, "prompts": self.prompts}
        out.update({f"pass@{k}": v for k, v in sorted(self.pass_at.items())})
        out["seconds"] = round(self.seconds, 3)
        return out


def summarize(correct_per_prompt: Sequence[int], n: int, ks: Sequence[int], seconds: float = 0.0) -> SampledResult:
    """Avg@n and pass@k from how many of each prompt's n samples were correct."""
    if not correct_per_prompt:
        raise ValueError("no prompts")
    prompts = len(correct_per_prompt)
    avg = sum(c / n for c in correct_per_prompt) / prompts
    pass_at = {k: sum(pass_at_k(n, c, k) for c in correct_per_prompt) / prompts for k in ks if k <= n}
    return SampledResult(n=n, prompts=prompts, avg_at_n=avg, pass_at=pass_at, seconds=seconds)


@torch.inference_mode()
def evaluate_sampled(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[PromptItem],
    *,
    n: int,
    ks: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> SampledResult:
    """Sample `n` responses to every prompt, grade them, and summarize."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct: list[int] = []
    try:
        per_batch = max(1, batch_size // n)
        for i in range(0, len(items), per_batch):
            chunk = items[i : i + per_batch]
            enc = tokenizer([it.prompt for it in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(  # type: ignore[operator]
                **enc.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                num_return_sequences=n,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for j, item in enumerate(chunk):
                grader = get_grader(item.grader)
                correct.append(sum(grader.score(t, item.answer) >= 1.0 for t in texts[j * n : (j + 1) * n]))
    finally:
        tokenizer.padding_side = side
    return summarize(correct, n, ks, time.perf_counter() - start)
