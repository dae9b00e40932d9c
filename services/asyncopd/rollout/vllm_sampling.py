"""Support drawn inside vLLM's sampler: the sampled token's log μ, student top-K and MC draws,
computed where the logits are and handed to the host as small arrays.

vLLM's own log-prob path returns one Python `Logprob` object per returned id per token, and for
Monte-Carlo draws it would need μ over the whole vocabulary on the host (`logprobs=-1`): at a
151,936-token vocabulary that is ~600 KB per generated token. Instead, the worker's sampler is
replaced by `SupportSampler`, a subclass of vLLM's `Sampler` that runs vLLM's sampling
unchanged and then, for each request that asked for it through `SamplingParams.extra_args`,
takes from the processed log-probs of that step (the distribution vLLM just sampled from, with
`logprobs_mode="processed_logprobs"`: temperature, then top-p masked and renormalized, i.e.
log μ as `rollout.sampling` defines it):

- the log μ of the sampled token;
- STUDENT_TOPK: the K ids of largest μ (descending) and their log μ;
- MC_SAMPLES: N i.i.d. draws from μ with replacement (N > |V| allowed) and their log μ; the
  engine puts the sampled token in column 0, so a request for N columns draws N - 1.

Greedy requests (temperature 0) are recorded as the point mass on the sampled argmax, as the
transformers engine does: log μ = 0 there; top-K pads with distinct ids of log μ = -inf; MC
draws are all the argmax.

Only ids (int32) and log μ (float32) cross to the host: 8 bytes per support column plus 8 for
the token and its log μ. Records are kept in the worker per request id and position, and the
engine collects a request's records when it finishes (`take`, through `collective_rpc`, which
also works when the worker is another process). Rows that vLLM discards (a chunked prefill
that is not finished yet) are skipped, so there is exactly one record per generated token.

Requests must be validated by the caller before they reach the engine (`support_args` does
it): an exception inside the sampler would kill the engine core.

This module knows vLLM's V1 model runner and sampler; it knows nothing of rollouts, the cache
or the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asyncopd.records import SupportKind

EXTRA_ARGS_KEY = "asyncopd_support"
"""The `SamplingParams.extra_args` key that asks the sampler for records: [kind, k, seed]."""

_GREEDY_EPS = 1e-5  # vLLM's own threshold below which a temperature means greedy


def support_args(kind: SupportKind, k: int, vocab_size: int, seed: int | None) -> dict[str, Any]:
    """The `extra_args` entry asking for per-token records; ValueError (naming the field) for bad
    input, so that nothing invalid ever reaches the sampler inside the engine.

    MC draws are with replacement, so N may exceed the vocabulary; top-K may not.
    """
    if kind == SupportKind.STUDENT_TOPK:
        if not 1 <= k <= vocab_size:
            raise ValueError(f"support_k: {k} must be in 1..{vocab_size} (the vocabulary size) for STUDENT_TOPK")
    elif kind == SupportKind.MC_SAMPLES:
        if k < 1:
            raise ValueError(f"support_k: {k} MC draws; must be >= 1 (the sampled token is column 0)")
    elif kind == SupportKind.NONE:
        k = 0
    else:
        raise ValueError(f"support_kind: unknown kind {kind!r}")
    if seed is not None:
        # The draws get their own stream: vLLM seeds the request's sampling generator with `seed`
        # itself, and the same stream would correlate the draws with the sampled token.
        seed = (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63)
    return {EXTRA_ARGS_KEY: [int(kind), int(k), seed if seed is not None else -1]}


@dataclass
class Records:
    """One request's per-token records, as the host receives them."""

    tokens: np.ndarray  # [T] int32, the sampled ids (a consistency check against vLLM's output)
    logprobs: np.ndarray  # [T] float32, log μ of the sampled ids
    support_ids: np.ndarray | None  # [T, k] int32
    support_logprobs: np.ndarray | None  # [T, k] float32

    @property
    def nbytes(self) -> int:
        arrays = (self.tokens, self.logprobs, self.support_ids, self.support_logprobs)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class _Pending:
    """Records of one request being generated (lives in the worker)."""

    kind: SupportKind
    k: int
    greedy: bool
    generator: torch.Generator | None
    steps: list[tuple[np.ndarray, ...]] = field(default_factory=list)


def _make_sampler_class() -> type:
    """vLLM's `Sampler` plus the records (see the module doc); built lazily so that importing
    this module needs no vLLM."""
    from vllm.v1.sample.sampler import Sampler

    class _SupportSampler(Sampler):
        def __init__(self, runner: Any, logprobs_mode: Any, use_fp64_gumbel: bool) -> None:
            super().__init__(logprobs_mode=logprobs_mode, use_fp64_gumbel=use_fp64_gumbel)
            self._runner = runner
            self._processed: torch.Tensor | None = None
            self.pending: dict[str, _Pending] = {}

        def sample(self, logits: torch.Tensor, sampling_metadata: Any, logprobs_mode_override: Any = None) -> Any:
            sampled, processed = super().sample(logits, sampling_metadata, logprobs_mode_override)
            self._processed = processed
            return sampled, processed

        def forward(self, logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kwargs: Any) -> Any:
            self._processed = None
            out = super().forward(logits, sampling_metadata, *args, **kwargs)
            processed, self._processed = self._processed, None
            self._record(out.sampled_token_ids[:, 0], processed)
            return out

        def _record(self, sampled: torch.Tensor, processed: torch.Tensor | None) -> None:
            runner = self._runner
            rows = sampled.shape[0]
            req_ids = runner.input_batch.req_ids[:rows]
            discard = runner.discard_request_mask.np[:rows]
            groups: dict[tuple[SupportKind, int, bool], list[tuple[int, str, _Pending]]] = {}
            for row, rid in enumerate(req_ids):
                if discard[row]:
                    continue
                pending = self.pending.get(rid)
                if pending is None:
                    params = runner.requests[rid].sampling_params
                    spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
                    if spec is None:
                        continue
                    kind, k, seed = SupportKind(spec[0]), int(spec[1]), int(spec[2])
                    generator = None
                    if seed >= 0 and kind == SupportKind.MC_SAMPLES:
                        generator = torch.Generator(device=sampled.device).manual_seed(seed)
                    greedy = params.temperature < _GREEDY_EPS
                    pending = self.pending[rid] = _Pending(kind, k, greedy, generator)
                greedy = processed is None or pending.greedy
                groups.setdefault((pending.kind, pending.k, greedy), []).append((row, rid, pending))
            for (kind, k, greedy), members in groups.items():
                index = torch.tensor([m[0] for m in members], device=sampled.device)
                tokens = sampled.index_select(0, index).long()
                if greedy:
                    arrays = _point_mass(tokens, kind, k)
                else:
                    assert processed is not None
                    arrays = _from_logmu(processed.index_select(0, index), tokens, kind, k, members)
                host = [a.cpu().numpy() for a in arrays]
                for i, (_, _, pending) in enumerate(members):
                    pending.steps.append(tuple(a[i] for a in host))

    return _SupportSampler


def _point_mass(tokens: torch.Tensor, kind: SupportKind, k: int) -> list[torch.Tensor]:
    zeros = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    out = [tokens.int(), zeros]
    if kind == SupportKind.STUDENT_TOPK:
        # The argmax, then k - 1 distinct other ids (0.., skipping the argmax) at log μ = -inf.
        others = torch.arange(k - 1, device=tokens.device).expand(tokens.shape[0], -1)
        others = others + (others >= tokens[:, None]).long()
        ids = torch.cat([tokens[:, None], others], dim=-1)
        lps = torch.full(ids.shape, float("-inf"), device=tokens.device)
        lps[:, 0] = 0.0
        out += [ids.int(), lps]
    elif kind == SupportKind.MC_SAMPLES:
        ids = tokens[:, None].expand(-1, k)
        out += [ids.int(), torch.zeros(ids.shape, dtype=torch.float32, device=tokens.device)]
    return out


def _from_logmu(
    logmu: torch.Tensor, tokens: torch.Tensor, kind: SupportKind, k: int, members: list[tuple[int, str, _Pending]]
) -> list[torch.Tensor]:
    logmu = logmu.float()
    out = [tokens.int(), logmu.gather(-1, tokens[:, None]).squeeze(-1)]
    if kind == SupportKind.STUDENT_TOPK:
        values, ids = logmu.topk(k, dim=-1)
        out += [ids.int(), values]
    elif kind == SupportKind.MC_SAMPLES:
        ids = tokens[:, None]
        if k > 1:
            probs = logmu.exp()
            draws = torch.empty((probs.shape[0], k - 1), dtype=torch.long, device=probs.device)
            seeded = [i for i, m in enumerate(members) if m[2].generator is not None]
            unseeded = [i for i, m in enumerate(members) if m[2].generator is None]
            if unseeded:
                rows = torch.tensor(unseeded, device=probs.device)
                draws[rows] = torch.multinomial(probs.index_select(0, rows), k - 1, replacement=True)
            for i in seeded:
                draws[i] = torch.multinomial(probs[i], k - 1, replacement=True, generator=members[i][2].generator)
            ids = torch.cat([ids, draws], dim=-1)
        out += [ids.int(), logmu.gather(-1, ids)]
    return out


def install(worker: Any) -> None:
    """Replace the worker's sampler by the recording one (run in the worker via `collective_rpc`)."""
    runner = worker.model_runner
    for attr in ("input_batch", "discard_request_mask", "requests", "sampler"):
        if not hasattr(runner, attr):
            raise RuntimeError(
                f"vLLM model runner {type(runner).__name__} has no {attr!r}: the in-engine support sampler "
                "needs the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)"
            )
    if getattr(runner, "speculative_config", None) is not None:
        raise RuntimeError("the in-engine support sampler does not support speculative decoding")
    old = runner.sampler
    if type(old).__name__ == "_SupportSampler":
        return
    runner.sampler = _make_sampler_class()(runner, old.logprobs_mode, old.use_fp64_gumbel)


def take(worker: Any, req_ids: list[str]) -> dict[str, Records]:
    """Remove and return the records of finished requests (run in the worker)."""
    sampler = worker.model_runner.sampler
    out: dict[str, Records] = {}
    for rid in req_ids:
        pending = sampler.pending.pop(rid, None)
        if pending is None:
            continue
        steps = pending.steps
        has_support = pending.kind != SupportKind.NONE
        out[rid] = Records(
            tokens=np.array([s[0] for s in steps], dtype=np.int32),
            logprobs=np.array([s[1] for s in steps], dtype=np.float32),
            support_ids=np.stack([s[2] for s in steps]).astype(np.int32) if has_support and steps else None,
            support_logprobs=np.stack([s[3] for s in steps]).astype(np.float32) if has_support and steps else None,
        )
    return out


def drop(worker: Any, req_ids: list[str]) -> None:
    """Forget the records of requests that will not be collected (aborted calls)."""
    pending = worker.model_runner.sampler.pending
    for rid in req_ids:
        pending.pop(rid, None)
