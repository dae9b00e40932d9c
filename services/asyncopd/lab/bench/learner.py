"""Peak memory of one learner step with a chunked LM head, and the loss it gives vs the plain head.

The model is a tiny random Qwen3 (2 layers, hidden 64) with a real vocabulary (V = 151,936):
its body costs almost nothing, so the step's memory is what the LM head and the estimator
take — the part `learner.logit_chunk_tokens` is about. One row of `--tokens` response tokens
(after a short prompt) goes through `Trainer.train` (forward, estimator, backward, AdamW step).
Support ids, behaviour and teacher log-probs are synthetic: MC ids drawn uniformly, log μ =
the student's own log-probs plus noise, log p = log μ plus noise (so ratios and advantages
are of a realistic size); for forward_kl_topk the student's own top-K with noisy teacher
log-probs.

Reported:
- the chunked step at `--tokens`: wall time and peak memory over the resident set before the
  step, as a fraction of one [T, V] fp32 logits tensor (the goal is <= 0.25; the unchunked
  head holds that tensor, its gradient and the estimator's temporaries);
- at `--compare-tokens` (a size whose unchunked step fits the machine): the chunked and the
  unchunked step from the same weights: their losses, the largest gradient difference relative
  to the largest gradient, and both peaks.

Memory is the process's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) as in
`asyncopd bench estimators`; n/a where that interface is missing. `add_args` and `run` at the
bottom are the `asyncopd bench learner` entry.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from asyncopd.lab.bench.estimators import _glibc, _reset_peak_rss, _return_freed_memory, _status_kib
from asyncopd.learner.batching import collate
from asyncopd.learner.trainer import Trainer, projected_response_logits
from asyncopd.opd import OPDLoss, gather_logprobs
from asyncopd.records import Rollout, ScoredSample, SupportKind, TaskInfo, TeacherScores

QWEN3_VOCAB = 151_936
"""Qwen3's embedding rows (151,669 tokens padded to a multiple of 128)."""
PROMPT = 32


@dataclass(frozen=True)
class StepResult:
    tokens: int
    chunked: bool
    seconds: float
    peak_bytes: int | None
    loss: float
    grads: list[torch.Tensor]


def tiny_qwen3(vocab: int, hidden: int, positions: int, seed: int) -> Qwen3ForCausalLM:
    """A random 2-layer Qwen3 with a full-size vocabulary (tied embedding and LM head)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)  # peaked, not uniform, next-token distributions
    return model


@torch.no_grad()
def synthetic_sample(model: Qwen3ForCausalLM, kind: str, tokens: int, k: int, seed: int) -> ScoredSample:
    """One row of `tokens` response tokens with the fields `kind` needs (computed chunked)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT,), generator=g)
    response = torch.randint(0, vocab, (tokens,), generator=g)
    rollout = Rollout(
        sample_id="bench",
        prompt_id="bench",
        ticket="",
        task=TaskInfo("bench", "0"),
        prompt_ids=prompt.numpy().astype(np.int32),
        response_ids=response.numpy().astype(np.int32),
        behavior_logprobs=np.zeros(tokens, np.float32),
        versions=np.zeros(tokens, np.int32),
    )
    # the student's own log-probs at the ids, through the chunked head (a [T, V] tensor would not fit)
    batch = collate([ScoredSample(rollout, TeacherScores("bench", np.zeros(tokens, np.float32)))], "forward_kl_full")
    logits = projected_response_logits(model, batch, 512)
    if kind == "forward_kl_topk":
        # the student's top-K stands in for the teacher's: one more chunked pass
        ids = torch.cat(
            [logits.chunk(lo, min(lo + 512, tokens)).materialize().topk(k, -1).indices for lo in range(0, tokens, 512)]
        ).reshape(1, tokens, k)
    else:
        ids = torch.randint(0, vocab, (1, tokens, k), generator=g)
        ids[..., 0] = response
    own = gather_logprobs(logits, ids)[0]
    behavior = (own + 0.1 * torch.randn(own.shape, generator=g)).clamp(max=0)
    teacher = (behavior + torch.randn(own.shape, generator=g)).clamp(max=-1e-3)
    if kind == "forward_kl_topk":
        scores = TeacherScores(
            "bench",
            np.zeros(tokens, np.float32),
            topk_ids=ids[0].numpy().astype(np.int32),
            topk_logprobs=teacher.numpy().astype(np.float32),
        )
        return ScoredSample(rollout, scores)
    mc = dataclasses.replace(
        rollout,
        support_kind=SupportKind.MC_SAMPLES,
        support_ids=ids[0].numpy().astype(np.int32),
        support_logprobs=behavior.numpy().astype(np.float32),
    )
    return ScoredSample(mc, TeacherScores("bench", np.zeros(tokens, np.float32), support_logprobs=teacher.numpy()))


def measure_step(
    model: Qwen3ForCausalLM,
    sample: ScoredSample,
    kind: str,
    *,
    chunk: int,
    compute_dtype: torch.dtype,
    keep_grads: bool,
) -> StepResult:
    """One `Trainer.train` step on a copy of `model`: time, peak RSS delta, loss, gradients."""
    student = copy.deepcopy(model)
    trainer = Trainer(
        student,
        OPDLoss(kind, correction="is") if kind == "reverse_kl_mc" else OPDLoss(kind, tail="bucket"),  # type: ignore[arg-type]
        lr=1e-5,
        micro_batch_size=1,
        param_dtype=torch.float32,
        compute_dtype=compute_dtype,
        logit_chunk_tokens=chunk,
    )
    libc = _glibc()
    _return_freed_memory(libc)
    measurable = _reset_peak_rss()
    before = _status_kib("VmRSS") if measurable else 0
    start = time.perf_counter()
    stats = trainer.train([sample])
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) * 1024 if measurable else None
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None] if keep_grads else []
    del trainer, student
    _return_freed_memory(libc)
    return StepResult(
        tokens=sample.rollout.num_tokens,
        chunked=bool(chunk),
        seconds=seconds,
        peak_bytes=peak,
        loss=stats[0].metrics["loss"],
        grads=grads,
    )


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of `asyncopd bench learner`; defaults: Qwen3's vocabulary, one 8,192-token row."""
    parser.add_argument("--tokens", type=int, default=8192, help="response tokens of the measured row")
    parser.add_argument(
        "--compare-tokens",
        type=int,
        default=1024,
        help="response tokens of the chunked-vs-unchunked comparison (the unchunked step must fit; 0: skip)",
    )
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB, help="vocabulary size V")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    parser.add_argument("--chunk", type=int, default=256, help="learner.logit_chunk_tokens of the chunked step")
    parser.add_argument("--kind", choices=("reverse_kl_mc", "forward_kl_topk"), default="reverse_kl_mc")
    parser.add_argument("--k", type=int, default=64, help="N MC samples / K top-K ids per position")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default; 1 on a shared machine)"
    )


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    compute = getattr(torch, args.compute_dtype)
    positions = PROMPT + max(args.tokens, args.compare_tokens) + 1
    model = tiny_qwen3(args.vocab, args.hidden, positions, args.seed)
    print(
        f"learner step, tiny Qwen3 (2 layers, hidden {args.hidden}) V={args.vocab} kind={args.kind} K=N={args.k} "
        f"compute={args.compute_dtype} chunk={args.chunk} threads={torch.get_num_threads()}",
        flush=True,
    )
    sample = synthetic_sample(model, args.kind, args.tokens, args.k, args.seed)
    chunked = measure_step(model, sample, args.kind, chunk=args.chunk, compute_dtype=compute, keep_grads=False)
    logits_bytes = args.tokens * args.vocab * 4
    ratio = "n/a" if chunked.peak_bytes is None else f"{chunked.peak_bytes / logits_bytes:.3f}"
    print(
        f"chunked step at T={args.tokens}: {chunked.seconds:.1f} s, peak {_mib(chunked.peak_bytes)} = {ratio} x one "
        f"[T, V] fp32 logits tensor ({_mib(logits_bytes)}; goal <= 0.25), loss {chunked.loss:.6f}",
        flush=True,
    )
    if args.compare_tokens:
        del sample
        small = synthetic_sample(model, args.kind, args.compare_tokens, args.k, args.seed + 1)
        a = measure_step(model, small, args.kind, chunk=args.chunk, compute_dtype=compute, keep_grads=True)
        b = measure_step(model, small, args.kind, chunk=0, compute_dtype=compute, keep_grads=True)
        scale = max(float(g.abs().max()) for g in b.grads)
        grad_diff = max(float((x - y).abs().max()) for x, y in zip(a.grads, b.grads, strict=True)) / scale
        small_bytes = args.compare_tokens * args.vocab * 4
        print(
            f"at T={args.compare_tokens} ([T, V] fp32 = {_mib(small_bytes)}): chunked loss {a.loss:.8f}, unchunked "
            f"{b.loss:.8f}, |diff| {abs(a.loss - b.loss):.2e} (relative {abs(a.loss - b.loss) / abs(b.loss):.2e}); "
            f"max |grad diff| / max |grad| {grad_diff:.2e}; peak chunked {_mib(a.peak_bytes)}, unchunked "
            f"{_mib(b.peak_bytes)}; time chunked {a.seconds:.1f} s, unchunked {b.seconds:.1f} s",
            flush=True,
        )
    print(
        "peak = RSS high-water mark during Trainer.train (forward, estimator, backward, AdamW step incl. its "
        "first-step state) minus RSS before it"
    )
    return 0
