"""Teacher scoring inside vLLM's model runner: per response position the log-probs at given ids,
the top-K and the tail log-mass, taken from the hidden states of the prefill where they are
computed, so that no [T, V] tensor ever leaves the engine.

vLLM's own `prompt_logprobs` returns the top-k per prompt position only, as one Python object
per id, and nothing at arbitrary ids (the student's top-K or MC draws). Its model runner
computes them in `_get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)`, called after
every step with the hidden states of all tokens scheduled in that step. `install` wraps that
method: for each request registered here (its `SamplingParams.extra_args[EXTRA_ARGS_KEY]`
names a registration), the positions of the step's chunk that predict a response token are
projected with `model.compute_logits` a block of rows at a time (`opd.vocab` chunk sizes) and
reduced by `teacher.logit_stats.chunk_stats` — the same function the torch scorer uses. Only
the reductions go to the host (float32/int32 arrays of [T, 1 + k], [T, K], [T]).

Chunked prefill and preemption are handled by position: each registration remembers the next
position it needs; a step's chunk contributes the positions it covers from there on (a
recomputed chunk after preemption adds nothing twice). A prefix-cache hit that starts beyond the
first needed position (a response prefix shared with an earlier rollout) leaves positions that
were never computed: the registration is marked `missed` and the caller resubmits the rollout
with `skip_reading_prefix_cache`.

With tensor parallelism every rank runs the same hook (compute_logits is a collective); ranks
that receive no logits skip the reductions, and the caller reads rank 0's results.

Every input must be validated by the caller before it is registered: an exception inside the
model runner would kill the engine core.

This module knows vLLM's V1 model runner; it knows nothing of rollouts, the cache or the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asyncopd.opd.numerics import rows_per_chunk
from asyncopd.opd.vocab import default_chunk_elements
from asyncopd.teacher.logit_stats import chunk_stats

EXTRA_ARGS_KEY = "asyncopd_score"
"""The `SamplingParams.extra_args` key naming a registration (a string key)."""

_STATE_ATTR = "_asyncopd_scoring"


@dataclass
class Spec:
    """What to compute for one request; `gather_ids[t]` = [response token t, support ids...]."""

    first: int  # sequence position predicting the first response token (prompt length - 1)
    gather_ids: np.ndarray  # [T, G] int64
    topk: int
    tail: bool


@dataclass
class Result:
    """One request's scores, as the host receives them."""

    gathered: np.ndarray  # [T, G] float32
    topk_ids: np.ndarray | None  # [T, K] int32
    topk_logprobs: np.ndarray | None  # [T, K] float32
    tail_logmass: np.ndarray | None  # [T] float32
    missed: bool = False  # some positions were never computed (prefix-cache hit): resubmit

    @property
    def nbytes(self) -> int:
        arrays = (self.gathered, self.topk_ids, self.topk_logprobs, self.tail_logmass)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class _Entry:
    spec: Spec
    result: Result
    next: int  # next sequence position still to be scored
    ids: torch.Tensor | None = None  # gather_ids on the device, made on first use

    @property
    def done(self) -> bool:
        return self.next >= self.spec.first + self.spec.gather_ids.shape[0]


@dataclass
class _State:
    entries: dict[str, _Entry] = field(default_factory=dict)
    chunk_elements: int | None = None


def _score_step(runner: Any, state: _State, hidden_states: torch.Tensor, num_scheduled: dict[str, int]) -> None:
    for req_id, count in num_scheduled.items():
        request = runner.requests.get(req_id)
        params = getattr(request, "sampling_params", None)
        key = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
        entry = state.entries.get(key) if key is not None else None
        if entry is None or entry.done or entry.result.missed:
            continue
        start = int(request.num_computed_tokens)  # first position scheduled in this step
        if start > entry.next:
            entry.result.missed = True  # positions start..next were read from the prefix cache
            continue
        spec = entry.spec
        stop = min(start + count, spec.first + spec.gather_ids.shape[0])
        begin = max(entry.next, spec.first)
        if stop <= begin:
            continue
        row0 = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        hidden = hidden_states[row0 + begin - start : row0 + stop - start]
        if entry.ids is None:
            entry.ids = torch.from_numpy(spec.gather_ids).to(hidden.device)
        rows = rows_per_chunk(
            runner.model_config.get_vocab_size(), state.chunk_elements or default_chunk_elements(hidden)
        )
        result = entry.result
        for a in range(0, hidden.shape[0], rows):
            b = min(a + rows, hidden.shape[0])
            logits = runner.model.compute_logits(hidden[a:b])
            if logits is None:  # a tensor-parallel rank that does not hold the gathered logits
                continue
            t0, t1 = begin - spec.first + a, begin - spec.first + b
            stats = chunk_stats(logits, entry.ids[t0:t1], spec.topk, spec.tail)
            result.gathered[t0:t1] = stats.gathered.cpu().numpy()
            if stats.topk_ids is not None and stats.topk_logprobs is not None:
                assert result.topk_ids is not None and result.topk_logprobs is not None
                result.topk_ids[t0:t1] = stats.topk_ids.cpu().numpy()
                result.topk_logprobs[t0:t1] = stats.topk_logprobs.cpu().numpy()
            if stats.tail_logmass is not None and result.tail_logmass is not None:
                result.tail_logmass[t0:t1] = stats.tail_logmass.cpu().numpy()
        entry.next = stop
        if entry.done:
            entry.ids = None


def install(worker: Any, chunk_elements: int | None = None) -> None:
    """Wrap the runner's prompt-log-prob step hook (run in the worker via `collective_rpc`)."""
    runner = worker.model_runner
    for attr in ("_get_prompt_logprobs_dict", "requests", "input_batch", "query_start_loc", "model"):
        if not hasattr(runner, attr):
            raise RuntimeError(
                f"vLLM model runner {type(runner).__name__} has no {attr!r}: the in-engine teacher scorer "
                "needs the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)"
            )
    if hasattr(runner, _STATE_ATTR):
        return
    state = _State(chunk_elements=chunk_elements)
    setattr(runner, _STATE_ATTR, state)
    original = runner._get_prompt_logprobs_dict

    def hooked(hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> Any:
        if state.entries:
            with torch.no_grad():
                _score_step(runner, state, hidden_states, num_scheduled_tokens)
        return original(hidden_states, num_scheduled_tokens)

    runner._get_prompt_logprobs_dict = hooked


def register(worker: Any, specs: dict[str, Spec]) -> None:
    """Add registrations (run in the worker), before their requests are added to the engine."""
    state: _State = getattr(worker.model_runner, _STATE_ATTR)
    for key, spec in specs.items():
        t, g = spec.gather_ids.shape
        state.entries[key] = _Entry(
            spec=spec,
            result=Result(
                gathered=np.zeros((t, g), dtype=np.float32),
                topk_ids=np.zeros((t, spec.topk), dtype=np.int32) if spec.topk else None,
                topk_logprobs=np.zeros((t, spec.topk), dtype=np.float32) if spec.topk else None,
                tail_logmass=np.zeros((t,), dtype=np.float32) if spec.topk and spec.tail else None,
            ),
            next=spec.first,
        )


def take(worker: Any, keys: list[str]) -> dict[str, Result]:
    """Remove and return the results of finished requests (run in the worker); a registration
    whose positions were not all scored comes back `missed`."""
    entries = getattr(worker.model_runner, _STATE_ATTR).entries
    out: dict[str, Result] = {}
    for key in keys:
        entry = entries.pop(key, None)
        if entry is None:
            continue
        if not entry.done:
            entry.result.missed = True
        out[key] = entry.result
    return out


def drop(worker: Any, keys: list[str]) -> None:
    """Forget registrations whose results will not be collected."""
    entries = getattr(worker.model_runner, _STATE_ATTR).entries
    for key in keys:
        entries.pop(key, None)
