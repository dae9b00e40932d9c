"""The vLLM teacher backend (`teacher.backend: vllm`): prefill-only scoring with an in-process
vLLM engine, the same answers as the torch scorer (`teacher.scorer`).

Each rollout becomes one request whose prompt is prompt + response and which generates a single
(greedy, discarded) token: vLLM prefills the whole sequence, in chunks of at most
`max_batch_tokens` scheduled tokens per step (vLLM's `max_num_batched_tokens`), batching many
rollouts per step and sharing the KV cache of common prompt prefixes when prefix caching is on.
`teacher.vllm_scoring` reduces the logits of the response positions inside the model runner;
this class registers what each request needs (response token + support ids per position, the
top-K, the tail), drives the engine and assembles `TeacherScores` from the small arrays that
come back. A rollout whose response prefix was served from the prefix cache (so some of its
positions were never computed) is scored again without reading the cache.

Every request is validated here before anything reaches the engine (`check_score_request`):
token ids out of range, a bad top-K or a sequence longer than the engine's context raise
ValueError naming the field, and the engine keeps serving.

Engine settings (tensor parallel size, memory fraction, max model length, CUDA graphs, prefix
caching, dtype) are constructor arguments; `teacher.main` passes `teacher.vllm` from the config.

This module knows vLLM's offline engine; it knows nothing of the cache or gRPC.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncopd.models.vllm_env import engine_args, prepare_vllm_env
from asyncopd.records import Rollout, TeacherScores
from asyncopd.teacher import vllm_scoring
from asyncopd.teacher.scorer import check_score_request


class VLLMTeacherScorer:
    """Scores rollouts with a frozen causal LM in an in-process vLLM engine."""

    def __init__(
        self,
        model_path: str,
        name: str = "",
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_batch_tokens: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        chunk_elements: int | None = None,
        extra_args: dict[str, Any] | None = None,
    ) -> None:
        prepare_vllm_env("VLLMTeacherScorer")
        from vllm import LLM

        role_args = {"max_num_batched_tokens": max_batch_tokens} if max_batch_tokens else {}
        args = engine_args(
            model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            extra_args=extra_args,
            **role_args,
        )
        self._llm = LLM(**args)
        self._engine = self._llm.llm_engine
        self._llm.collective_rpc(vllm_scoring.install, args=(chunk_elements,))
        model_config = self._engine.model_config
        self._name = name
        self.vocab_size = int(model_config.get_vocab_size())
        # vLLM refuses a prompt of max_model_len tokens (no room for the one generated token).
        self.max_len = int(model_config.max_model_len) - 1
        self._lock = threading.Lock()  # one scoring call drives the engine at a time
        self._ids = itertools.count()
        self.rescored = 0
        """Rollouts scored a second time because the prefix cache skipped some of their positions."""
        self.host_bytes = 0
        """Bytes of per-position results the engine has handed to the host so far."""

    def check(self, rollouts: Sequence[Rollout], topk: int, tail: bool) -> None:
        check_score_request(rollouts, topk, tail, self.vocab_size, self.max_len)

    def close(self) -> None:
        del self._engine
        del self._llm

    def score(self, rollouts: Sequence[Rollout], topk: int, tail: bool = False) -> list[TeacherScores]:
        """Scores in the order of `rollouts`."""
        self.check(rollouts, topk, tail)
        jobs = [(self._sequence(r), self._spec(r, topk, tail)) for r in rollouts]
        with self._lock:
            results = self._run(jobs, skip_cache=False)
            missed = [i for i, res in enumerate(results) if res.missed]
            if missed:
                self.rescored += len(missed)
                again = self._run([jobs[i] for i in missed], skip_cache=True)
                for i, res in zip(missed, again, strict=True):
                    if res.missed:
                        raise RuntimeError(f"rollouts[{i}]: the engine did not compute every response position")
                    results[i] = res
        out = []
        for r, res in zip(rollouts, results, strict=True):
            self.host_bytes += res.nbytes
            width = 0 if r.support_ids is None else r.support_ids.shape[1]
            out.append(
                TeacherScores(
                    sample_id=r.sample_id,
                    token_logprobs=res.gathered[:, 0],
                    topk_ids=res.topk_ids,
                    topk_logprobs=res.topk_logprobs,
                    support_logprobs=res.gathered[:, 1 : 1 + width] if r.support_ids is not None else None,
                    tail_logmass=res.tail_logmass,
                    teacher=self._name,
                )
            )
        return out

    @staticmethod
    def _sequence(rollout: Rollout) -> list[int]:
        return np.concatenate([rollout.prompt_ids, rollout.response_ids]).astype(np.int64).tolist()

    @staticmethod
    def _spec(rollout: Rollout, topk: int, tail: bool) -> vllm_scoring.Spec:
        columns = [np.asarray(rollout.response_ids, dtype=np.int64)[:, None]]
        if rollout.support_ids is not None:
            columns.append(np.asarray(rollout.support_ids, dtype=np.int64))
        return vllm_scoring.Spec(
            first=len(rollout.prompt_ids) - 1,
            gather_ids=np.ascontiguousarray(np.concatenate(columns, axis=1)),
            topk=topk,
            tail=tail and topk > 0,
        )

    def _run(self, jobs: list[tuple[list[int], vllm_scoring.Spec]], *, skip_cache: bool) -> list[vllm_scoring.Result]:
        """Register, add and step until every request has finished; the results in job order."""
        from vllm import SamplingParams

        keys = [f"s{next(self._ids)}" for _ in jobs]
        rpc = self._llm.collective_rpc
        rpc(vllm_scoring.register, args=({k: spec for k, (_, spec) in zip(keys, jobs, strict=True)},))
        added: list[str] = []
        try:
            pending: set[str] = set()
            for key, (sequence, _) in zip(keys, jobs, strict=True):
                params = SamplingParams(
                    n=1,
                    temperature=0.0,
                    max_tokens=1,
                    detokenize=False,
                    extra_args={vllm_scoring.EXTRA_ARGS_KEY: key},
                    skip_reading_prefix_cache=True if skip_cache else None,
                )
                prompt: Any = {"prompt_token_ids": sequence}
                returned = self._engine.add_request(key, prompt, params)
                added.append(returned)
                pending.update((key, returned))
            finished = 0
            while finished < len(jobs):
                for out in self._engine.step():
                    if out.finished and out.request_id in pending:
                        finished += 1
            results = rpc(vllm_scoring.take, args=(keys,))[0]
        except BaseException:
            if added:
                self._engine.abort_request(added, internal=True)
            rpc(vllm_scoring.drop, args=(keys,))
            raise
        return [results[k] for k in keys]
