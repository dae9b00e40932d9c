"""Simulated rollout and teacher engines: valid records of realistic shapes, no model compute.

A `SimulatedRollout` turns admitted prompts into `Rollout` records whose response lengths are
drawn from a clipped log-normal, whose per-position support (student top-K or MC samples) has
K distinct ids with sorted, normalisable log-probs, and whose per-token versions follow the
shared `SimulatedWeights` (a weight update lands between two simulated decode chunks, as in a
real engine). It sleeps so that one replica emits `tokens_per_s` tokens per second.
`SimulatedTeacher` scores such rollouts (token log-probs, top-K, support log-probs, tail mass)
and sleeps for `tokens / tokens_per_s`.

It knows the domain records; it knows nothing of gRPC, the cache or Redis.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from asyncopd.records import Prompt, Rollout, SupportKind, TeacherScores

# Decode chunks per response: how often a simulated engine looks for new weights.
_DECODE_CHUNKS = 8


class SimulatedWeights:
    """The policy version every simulated replica currently holds (an instant weight sync)."""

    def __init__(self) -> None:
        self._version = 0
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def publish(self, version: int) -> None:
        with self._lock:
            self._version = max(self._version, version)


@dataclass(frozen=True)
class LengthModel:
    """Response lengths: log-normal with the given mean, clipped to [1, max_tokens]."""

    mean_tokens: float
    max_tokens: int
    sigma: float = 0.6

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = np.log(self.mean_tokens) - self.sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2/2)
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, n)), 1, self.max_tokens).astype(np.int64)

    def expected(self, samples: int = 200_000) -> float:
        """Mean of the clipped distribution (Monte Carlo, fixed seed): what the ideal rates use."""
        return float(self.draw(np.random.default_rng(12345), samples).mean())


def _log_distribution(rng: np.random.Generator, t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position, K sorted log-probs of a random distribution and the log-mass left outside."""
    logits = rng.standard_normal((t, k + 1)).astype(np.float32) * 2.0
    logits[:, k] += 2.0  # the tail bucket stands for the rest of the vocabulary
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = -np.sort(-logp[:, :k], axis=1)
    return np.minimum(top, 0.0), np.minimum(logp[:, k], 0.0)


def _distinct_ids(rng: np.random.Generator, t: int, k: int, vocab: int) -> np.ndarray:
    """[t, k] token ids, distinct within each row."""
    stride = max(1, vocab // k)
    base = rng.integers(0, vocab, size=(t, 1))
    return ((base + np.arange(k) * stride) % vocab).astype(np.int32)


class SimulatedRollout:
    """A rollout engine that emits valid records at `tokens_per_s` and computes nothing."""

    def __init__(
        self,
        name: str,
        weights: SimulatedWeights,
        *,
        tokens_per_s: float,
        lengths: LengthModel,
        support_kind: SupportKind,
        k: int,
        vocab_size: int,
        seed: int,
    ) -> None:
        if tokens_per_s <= 0:
            raise ValueError(f"rollout tokens_per_s must be > 0, got {tokens_per_s}")
        if support_kind != SupportKind.NONE and not 1 <= k <= vocab_size:
            raise ValueError(f"support size k must be in 1..{vocab_size}, got {k}")
        self.name = name
        self.weights = weights
        self.tokens_per_s = tokens_per_s
        self.lengths = lengths
        self.support_kind = support_kind
        self.k = k
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)
        self.tokens_generated = 0

    def generate(self, prompts: Sequence[Prompt], stop: threading.Event) -> list[Rollout]:
        """Emulate one batched generation; raises InterruptedError if `stop` is set meanwhile."""
        n = len(prompts)
        lengths = self.lengths.draw(self._rng, n)
        longest = int(lengths.max())
        # A batch decodes position by position: position p of every live sequence is produced at
        # the same step, so the version at a position is the one held when that chunk started.
        bounds = np.linspace(0, longest, min(_DECODE_CHUNKS, longest) + 1).astype(np.int64)
        version_at = np.zeros(longest, np.int32)
        tokens_done = 0
        start = time.monotonic()
        for lo, hi in itertools.pairwise(bounds):
            version_at[lo:hi] = self.weights.version
            tokens_done += int(np.clip(lengths - lo, 0, hi - lo).sum())
            if stop.wait(max(0.0, start + tokens_done / self.tokens_per_s - time.monotonic())):
                raise InterruptedError(f"{self.name} stopped during generation")
        self.tokens_generated += tokens_done
        now = time.time()
        return [self._rollout(p, int(t), version_at[:t], now) for p, t in zip(prompts, lengths, strict=True)]

    def _rollout(self, prompt: Prompt, t: int, versions: np.ndarray, now: float) -> Rollout:
        rng = self._rng
        support_ids = support_lps = None
        if self.support_kind == SupportKind.STUDENT_TOPK:
            support_ids = _distinct_ids(rng, t, self.k, self.vocab_size)
            support_lps, _ = _log_distribution(rng, t, self.k)
            pick = rng.integers(0, self.k, t)
            response = support_ids[np.arange(t), pick]
            behavior = support_lps[np.arange(t), pick]
        elif self.support_kind == SupportKind.MC_SAMPLES:
            support_ids = rng.integers(0, self.vocab_size, size=(t, self.k)).astype(np.int32)
            response = support_ids[:, 0].copy()
            support_lps = -rng.exponential(2.0, size=(t, self.k)).astype(np.float32)
            behavior = support_lps[:, 0].copy()
        else:
            response = rng.integers(0, self.vocab_size, t).astype(np.int32)
            behavior = -rng.exponential(1.0, t).astype(np.float32)
        return Rollout(
            sample_id=f"{prompt.ticket}/{self.name}",
            prompt_id=prompt.prompt_id,
            ticket=prompt.ticket,
            task=prompt.task,
            prompt_ids=prompt.prompt_ids,
            response_ids=response.astype(np.int32),
            behavior_logprobs=behavior.astype(np.float32),
            versions=versions.astype(np.int32),
            support_kind=self.support_kind,
            support_ids=support_ids,
            support_logprobs=support_lps,
            replica=self.name,
            truncated=t >= self.lengths.max_tokens,
            created_unix=now,
        )


class SimulatedTeacher:
    """A teacher that returns valid scores at `tokens_per_s` and computes nothing."""

    def __init__(self, name: str, *, tokens_per_s: float, topk: int, vocab_size: int, seed: int) -> None:
        if tokens_per_s <= 0:
            raise ValueError(f"teacher tokens_per_s must be > 0, got {tokens_per_s}")
        if not 1 <= topk <= vocab_size:
            raise ValueError(f"teacher topk must be in 1..{vocab_size}, got {topk}")
        self.name = name
        self.tokens_per_s = tokens_per_s
        self.topk = topk
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)
        self.tokens_scored = 0

    def score(self, rollouts: Sequence[Rollout], stop: threading.Event) -> list[TeacherScores]:
        """Emulate one prefill over the rollouts; raises InterruptedError if `stop` is set."""
        start = time.monotonic()
        scores = [self._score(r) for r in rollouts]
        busy = sum(r.num_tokens for r in rollouts) / self.tokens_per_s
        if stop.wait(max(0.0, start + busy - time.monotonic())):
            raise InterruptedError(f"{self.name} stopped during scoring")
        self.tokens_scored += sum(r.num_tokens for r in rollouts)
        return scores

    def _score(self, rollout: Rollout) -> TeacherScores:
        rng = self._rng
        t = rollout.num_tokens
        topk_lps, tail = _log_distribution(rng, t, self.topk)
        topk_ids = _distinct_ids(rng, t, self.topk, self.vocab_size)
        support_lps = None
        if rollout.support_ids is not None:
            support_lps = -rng.exponential(2.0, size=rollout.support_ids.shape).astype(np.float32)
        token = -rng.exponential(2.0, t).astype(np.float32)
        if support_lps is not None and rollout.support_kind == SupportKind.MC_SAMPLES:
            token = support_lps[:, 0].copy()  # column 0 is the generated token
        return TeacherScores(
            sample_id=rollout.sample_id,
            token_logprobs=token,
            topk_ids=topk_ids,
            topk_logprobs=topk_lps,
            support_logprobs=support_lps,
            tail_logmass=tail,
            teacher=self.name,
        )
