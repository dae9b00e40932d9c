"""The wide-vocabulary world's models: a tiny Qwen3 teacher and student with Qwen3's 151,936-row
embedding and the real Qwen3 tokenizer, trained on the wide task (`asyncopd.tasks.wide.task`).

Built at set-up (`make wide`, `asyncopd toy wide`), deterministically for a seed and a thread
count, in about a minute on two cores. Training a 151,936-way softmax on a CPU would take far
longer, so both models are trained on the task's own tokens (the ~90 ids its prompts and walks
use) with every other row of the embedding held at zero: such a row's logit is exactly 0 for
any hidden state, so the full model's log-normaliser is the compact one's plus the other rows'
`log(count)` at logit 0 — the training loss below adds that as one extra logit, and the saved
full-vocabulary model gives exactly the distribution that was trained. The untouched rows still
carry mass (the teacher leaves ~1e-4 of it there), and the learner, the rollout's draws and the
teacher scorer all work over the whole vocabulary.

The teacher is trained until it walks well (spreading its mass over the graph's twelve allowed
animals: a top-8 list misses about a fifth of it at a walk position); the student, narrower and
shallower, gets a short start, so distillation has something to teach it.

This module knows the task, the Qwen3 tokenizer and the model configs; nothing of the services.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from asyncopd.models.chat import chat_formatter
from asyncopd.models.qwen_tokenizer import QWEN3_EMBEDDING_ROWS, build_qwen3_tokenizer
from asyncopd.tasks.wide import task as wide_task

Role = Literal["teacher", "student"]
METADATA_FILE = "asyncopd_wide.json"
TEACHER_DIR = "wide-teacher"
STUDENT_DIR = "wide-student"
MAX_POSITIONS = 1024
# Response tokens at most: 290 (26 lines of 11 tokens, the end line, the end-of-turn token).
MAX_NEW_TOKENS = 320


@dataclass(frozen=True)
class WideSettings:
    """One role's training run."""

    role: Role
    seed: int = 0
    steps: int = 400
    batch_size: int = 8
    lr: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    soft_targets: bool = False
    """Train on the task's distribution at free choices (`compact_loss`'s `soft`), not on draws."""
    line_start_weight: float = 1.0
    """Loss weight of a line's first animal (with soft targets)."""
    hidden_size: int = 128
    layers: int = 2


def default_settings(role: Role, seed: int = 0) -> WideSettings:
    if role == "teacher":
        return WideSettings(role="teacher", seed=seed, steps=400, lr=1e-2, soft_targets=True, line_start_weight=3.0)
    return WideSettings(role="student", seed=seed, steps=250, hidden_size=64)


def model_config(settings: WideSettings, vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> Qwen3Config:
    """A role's architecture at `vocab_size` rows; head_dim 32 as vLLM's CPU attention needs."""
    full = vocab_size == QWEN3_EMBEDDING_ROWS
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=3 * settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.hidden_size // 32,
        num_key_value_heads=settings.hidden_size // 32,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        # Untied (as Qwen3-8B): a tied tiny model sits for hundreds of steps on the unigram
        # plateau before it learns which animal may follow which.
        tie_word_embeddings=False,
        # As Qwen3's own configs: no pad id (padding_idx would freeze that row), bos = <|endoftext|>.
        # The compact training model has none of them (its ids are not Qwen3's).
        bos_token_id=tokenizer.pad_token_id if full else None,
        eos_token_id=tokenizer.eos_token_id if full else None,
        pad_token_id=None,
        dtype="float32",
    )


@dataclass(frozen=True)
class Corpus:
    """Training sequences in the compact vocabulary: ids, loss labels (-100 off the response),
    the full-vocabulary id of each compact id, and the task's own next-token distribution: at a
    label position whose token was a free choice, `after` is the compact id of the animal it
    followed (-1 elsewhere) and `transition[after]` the graph's probabilities (compact ids)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    used_ids: torch.Tensor
    after: torch.Tensor
    transition: torch.Tensor
    line_start: torch.Tensor
    """A line's first animal: it follows the one three tokens back (past the newline and the
    label), which a small model learns much later than the rest."""

    @property
    def compact_size(self) -> int:
        return int(self.used_ids.numel())


def task_ids(tokenizer: PreTrainedTokenizerBase, format_prompt: Callable[[str], str]) -> list[int]:
    """Every id a wide prompt or response can contain (the formatted prompt, every line label
    with every animal, the end line, end-of-turn and padding), sorted."""
    texts = [format_prompt(f"{wide_task.PROMPT_HEADER}\n{wide_task.LABELS[0]}: {' '.join(wide_task.ANIMALS)}")]
    texts += [f"{label}: {' '.join(wide_task.ANIMALS)}\n" for label in wide_task.LABELS]
    texts += [f"{wide_task.END_MARK}: {animal}" for animal in wide_task.ANIMALS]
    ids = {int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)}
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.update(int(i) for i in row)
    return sorted(ids)


def build_corpus(
    tokenizer: PreTrainedTokenizerBase,
    format_prompt: Callable[[str], str],
    count: int,
    seed: int,
    split: wide_task.Split = "train",
) -> Corpus:
    """`count` prompts of `split`, each with one random correct response, in compact ids."""
    used = task_ids(tokenizer, format_prompt)
    to_compact = {full: i for i, full in enumerate(used)}
    problems = wide_task.sample_problems(split, count, seed)
    rng = random.Random(f"wide-corpus:{seed}:{split}")
    prompts = [format_prompt(p.prompt) for p in problems]
    responses = [p.sample_response(rng) for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    seqs = [list(p) + list(r) + [eos] for p, r in zip(prompt_ids, response_ids, strict=True)]
    animal_of = {c: name for c, full in enumerate(used) if (name := _animal(tokenizer, full))}
    if sorted(animal_of.values()) != sorted(wide_task.ANIMALS):
        raise ValueError("every animal of the wide task must be one Qwen3 token (with its leading space)")
    compact_of = {name: c for c, name in animal_of.items()}
    transition = torch.zeros(len(used), len(used))
    for name, c in compact_of.items():
        for nxt, prob in wide_task.successors(name).items():
            transition[c, compact_of[nxt]] = prob
    width = max(len(s) for s in seqs)
    input_ids = torch.full((count, width), to_compact[pad], dtype=torch.long)
    labels = torch.full((count, width), -100, dtype=torch.long)
    after = torch.full((count, width), -1, dtype=torch.long)
    line_start = torch.zeros((count, width), dtype=torch.bool)
    mask = torch.zeros((count, width), dtype=torch.long)
    for row, (seq, prompt) in enumerate(zip(seqs, prompt_ids, strict=True)):
        try:
            compact = [to_compact[t] for t in seq]
        except KeyError as err:
            raise ValueError(f"token id {err} of a wide sequence is not among the task's ids") from None
        input_ids[row, : len(seq)] = torch.tensor(compact)
        labels[row, len(prompt) : len(seq)] = torch.tensor(compact[len(prompt) :])
        mask[row, : len(seq)] = 1
        last = -1
        for t, c in enumerate(compact):
            if c in animal_of:
                if t >= len(prompt) and last >= 0 and transition[last, c] > 0:
                    after[row, t] = last
                    if compact[t - 1] not in animal_of:
                        line_start[row, t] = True
                last = c
    return Corpus(input_ids, labels, mask, torch.tensor(used), after, transition, line_start)


def compact_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    other_rows: int,
    soft: tuple[torch.Tensor, torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of the full-vocabulary model whose `other_rows` embedding rows are
    zero: the compact logits plus one logit log(other_rows) standing for all of them (logit 0).

    `soft` = (after, transition): where `after` >= 0 the target is the task's distribution
    `transition[after]` instead of the token drawn from it (same expected gradient, far less
    noise: the graph's weights are learnt in a few hundred steps). `weight`: per-position loss
    weights (the mean is weighted)."""
    rest = torch.full((*logits.shape[:-1], 1), math.log(other_rows), dtype=logits.dtype)
    logp = torch.log_softmax(torch.cat([logits, rest], dim=-1)[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    hard = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if soft is not None:
        after = soft[0][:, 1:]
        free = after >= 0
        dist = soft[1][after.clamp(min=0)]
        soft_ce = -(dist * logp[..., : dist.shape[-1]]).sum(-1)
        hard = torch.where(free, soft_ce, hard)
    if weight is None:
        return hard[keep].mean()
    w = weight[:, 1:][keep]
    return (hard[keep] * w).sum() / w.sum()


def _lr_factor(step: int, settings: WideSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_compact(
    settings: WideSettings,
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    log: Callable[[str], None] = print,
) -> tuple[Qwen3ForCausalLM, list[dict[str, float]]]:
    """Train one role in the compact vocabulary; the model and its loss curve."""
    torch.manual_seed(settings.seed)
    model = Qwen3ForCausalLM(model_config(settings, corpus.compact_size, tokenizer))
    model.train()
    other_rows = QWEN3_EMBEDDING_ROWS - corpus.compact_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(corpus.input_ids.shape[0], generator=generator)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    cursor = 0
    for step in range(1, settings.steps + 1):
        if cursor + settings.batch_size > len(order):
            order = torch.randperm(corpus.input_ids.shape[0], generator=generator)
            cursor = 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        out = model(input_ids=corpus.input_ids[idx], attention_mask=corpus.attention_mask[idx])
        soft = (corpus.after[idx], corpus.transition) if settings.soft_targets else None
        weight = None
        if settings.soft_targets and settings.line_start_weight != 1.0:
            weight = 1.0 + (settings.line_start_weight - 1.0) * corpus.line_start[idx].float()
        loss = compact_loss(out.logits, corpus.labels[idx], other_rows, soft, weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == settings.steps:
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": round(loss.item(), 4), "s": round(elapsed, 1)})
            log(f"{settings.role} step {step} loss {loss.item():.4f} ({elapsed:.0f}s)")
    model.eval()
    return model, history


def expand(
    compact: Qwen3ForCausalLM, settings: WideSettings, used_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase
) -> Qwen3ForCausalLM:
    """The full-vocabulary model: the compact one's weights, its embedding and LM-head rows
    placed at their Qwen3 ids, every other row zero."""
    full = Qwen3ForCausalLM(model_config(settings, QWEN3_EMBEDDING_ROWS, tokenizer))
    state = dict(compact.state_dict())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.zeros(QWEN3_EMBEDDING_ROWS, compact.config.hidden_size)
        rows[used_ids] = state[name].detach()
        state[name] = rows
    full.load_state_dict(state, strict=True)
    full.eval()
    return full


@torch.inference_mode()
def walk_statistics(
    model: Qwen3ForCausalLM,
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[int],
    k: int = 8,
    *,
    compact: bool = True,
) -> dict[str, float]:
    """On teacher-forced held-out task sequences, over response positions: the mean mass a
    top-`k` list misses, the mean entropy, the mean mass on animals the graph does not allow
    where an animal comes next, the mean mass off the determined token everywhere else, and the
    probability that sampling would produce the whole response correctly (the product of the
    allowed masses along each sequence, averaged).

    `compact`: `model` is the compact-vocabulary model (the other rows added as one logit);
    else a full-vocabulary model, fed the corpus's Qwen3 ids."""
    idx = torch.tensor(list(rows))
    ids = corpus.input_ids[idx]
    logits = model(
        input_ids=ids if compact else corpus.used_ids[ids], attention_mask=corpus.attention_mask[idx]
    ).logits[:, :-1]
    if compact:
        rest = QWEN3_EMBEDDING_ROWS - corpus.compact_size
        logits = torch.cat([logits, torch.full((*logits.shape[:-1], 1), math.log(rest))], dim=-1)
    else:
        logits = torch.cat([logits[..., corpus.used_ids], _other_logsumexp(logits, corpus.used_ids)], dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = corpus.labels[idx][:, 1:]
    animal_of = {int(c): name for c, full in enumerate(corpus.used_ids.tolist()) if (name := _animal(tokenizer, full))}
    compact_of = {name: c for c, name in animal_of.items()}
    missing: list[float] = []
    entropy: list[float] = []
    invalid: list[float] = []
    off: list[float] = []
    other: list[float] = []
    valid_logprob: list[float] = []
    for row in range(ids.shape[0]):
        last: str | None = None
        total = 0.0
        for t in range(target.shape[1]):
            token = int(ids[row, t])
            if token in animal_of:
                last = animal_of[token]
            if int(target[row, t]) == -100:
                continue
            lp = logp[row, t]
            missing.append(1 - float(lp.topk(k).values.exp().sum()))
            entropy.append(float(-(lp.exp() * lp).sum()))
            other.append(float(lp[-1].exp()))
            if int(target[row, t]) in animal_of and last is not None:
                allowed = [compact_of[a] for a in wide_task.successors(last)]
                bad = 1 - float(lp[allowed].exp().sum())
                invalid.append(bad)
            else:
                bad = 1 - float(lp[int(target[row, t])].exp())
                off.append(bad)
            total += math.log(max(1e-30, 1 - bad))
        valid_logprob.append(total)
    return {
        f"top{k}_missing_mass": _mean(missing),
        "entropy_nats": _mean(entropy),
        "invalid_animal_mass": _mean(invalid),
        "off_structure_mass": _mean(off),
        "other_rows_mass": _mean(other),
        "p_correct_sampled": _mean([math.exp(v) for v in valid_logprob]),
        "positions": float(len(missing)),
    }


def _other_logsumexp(logits: torch.Tensor, used_ids: torch.Tensor) -> torch.Tensor:
    """log Σ exp(logit) over the rows that are not the task's, as one column."""
    masked = logits.clone()
    masked[..., used_ids] = -math.inf
    return torch.logsumexp(masked, dim=-1, keepdim=True)


def _animal(tokenizer: PreTrainedTokenizerBase, full_id: int) -> str | None:
    text = str(tokenizer.decode([full_id]))
    name = text.strip()
    return name if text.startswith(" ") and name in wide_task.ANIMALS else None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def save_model(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path, metadata: dict) -> Path:
    """A standard HF directory: float32 safetensors, the Qwen3 tokenizer, a generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def build_world(
    out_root: Path, *, seed: int = 0, log: Callable[[str], None] = print, **overrides: Any
) -> dict[str, Any]:
    """Build the tokenizer, train both roles and save `out_root/wide-teacher` and
    `out_root/wide-student`; returns a summary (times, losses, measured top-8 missing mass)."""
    start = time.perf_counter()
    tokenizer = build_qwen3_tokenizer()
    format_prompt = chat_formatter(tokenizer, enable_thinking=False, model="qwen3")
    log(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - start:.0f}s)")
    teacher_settings = default_settings("teacher", seed)
    student_settings = default_settings("student", seed)
    if overrides:
        teacher_settings = WideSettings(**{**asdict(teacher_settings), **overrides.get("teacher", {})})
        student_settings = WideSettings(**{**asdict(student_settings), **overrides.get("student", {})})
    need = max(s.steps * s.batch_size for s in (teacher_settings, student_settings))
    corpus = build_corpus(tokenizer, format_prompt, min(need, 4096) + 64, seed)
    held_out = range(corpus.input_ids.shape[0] - 64, corpus.input_ids.shape[0])
    log(f"corpus: {corpus.input_ids.shape[0]} sequences × {corpus.input_ids.shape[1]}, {corpus.compact_size} ids")
    summary: dict[str, Any] = {"seed": seed, "task_ids": corpus.compact_size, "roles": {}}
    for settings, directory in ((teacher_settings, TEACHER_DIR), (student_settings, STUDENT_DIR)):
        began = time.perf_counter()
        train_rows = _without(corpus, len(held_out))
        compact, history = train_compact(settings, train_rows, tokenizer, log)
        stats = walk_statistics(compact, corpus, tokenizer, list(held_out)[:16])
        full = expand(compact, settings, corpus.used_ids, tokenizer)
        metadata = {
            "settings": asdict(settings),
            "seconds": round(time.perf_counter() - began, 1),
            "params": sum(p.numel() for p in full.parameters()),
            "history": history,
            "held_out": stats,
        }
        save_model(full, tokenizer, out_root / directory, metadata)
        summary["roles"][settings.role] = metadata
        log(f"{settings.role}: {json.dumps(stats)} ({metadata['seconds']}s)")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def _without(corpus: Corpus, tail: int) -> Corpus:
    n = corpus.input_ids.shape[0] - tail
    return Corpus(
        corpus.input_ids[:n],
        corpus.labels[:n],
        corpus.attention_mask[:n],
        corpus.used_ids,
        corpus.after[:n],
        corpus.transition,
        corpus.line_start[:n],
    )


def world_ready(out_root: Path) -> bool:
    """Whether both models of a finished build are in `out_root` (metadata is written last)."""
    return all((out_root / d / METADATA_FILE).is_file() for d in (TEACHER_DIR, STUDENT_DIR))


@torch.inference_mode()
def held_out_report(student_dir: str | Path, teacher_dir: str | Path, rows: int = 8, seed: int = 1) -> dict[str, float]:
    """How far a student is from the teacher on held-out task sequences (test-split prompts, a
    correct response drawn from the task's distribution), over response positions, at the full
    vocabulary, one sequence at a time: per-token forward KL(teacher ‖ student) and reverse
    KL(student ‖ teacher), and each model's `walk_statistics` (the teacher's top-8 missing mass
    among them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    format_prompt = chat_formatter(tokenizer, enable_thinking=False, model=str(teacher_dir))
    corpus = _test_corpus(tokenizer, format_prompt, rows, seed)
    models = {
        "teacher": Qwen3ForCausalLM.from_pretrained(str(teacher_dir)).eval(),
        "student": Qwen3ForCausalLM.from_pretrained(str(student_dir)).eval(),
    }
    kl_sum, reverse_sum, positions = 0.0, 0.0, 0
    stats: dict[str, list[dict[str, float]]] = {"teacher": [], "student": []}
    for row in range(rows):
        ids = corpus.used_ids[corpus.input_ids[row : row + 1]]
        keep = corpus.labels[row : row + 1, 1:] != -100
        logp = {}
        for role, model in models.items():
            logp[role] = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)[keep]
            stats[role].append(walk_statistics(model, corpus, tokenizer, [row], compact=False))
        kl_sum += float((logp["teacher"].exp() * (logp["teacher"] - logp["student"])).sum())
        reverse_sum += float((logp["student"].exp() * (logp["student"] - logp["teacher"])).sum())
        positions += int(keep.sum())
    out = {
        "kl_teacher_student": kl_sum / positions,
        "kl_student_teacher": reverse_sum / positions,
        "positions": float(positions),
    }
    for role, rows_stats in stats.items():
        for key in (
            "top8_missing_mass",
            "entropy_nats",
            "invalid_animal_mass",
            "off_structure_mass",
            "other_rows_mass",
        ):
            out[f"{role}_{key}"] = _mean([s[key] for s in rows_stats])
        out[f"{role}_p_correct_sampled"] = _mean([s["p_correct_sampled"] for s in rows_stats])
    return out


def _test_corpus(
    tokenizer: PreTrainedTokenizerBase, format_prompt: Callable[[str], str], rows: int, seed: int
) -> Corpus:
    """Like `build_corpus`, on test-split prompts."""
    return build_corpus(tokenizer, format_prompt, rows, seed, split="test")
