"""The rollout engine interface, and what every engine shares: request checks, stop handling and
assembling the `Rollout` records.

An engine holds the student, generates responses and records per token the sampled id, its
log-prob under the behaviour distribution μ (see `rollout.sampling`), and the policy version of
the weights that produced it; plus the per-position support the estimator needs. `load_weights`
is atomic with respect to generation: every token sampled after it returns carries the new
version, and a response generated across the switch carries both versions, per token.
Streaming engines (vLLM) also take requests one by one while others decode (`submit`) and hand
back each rollout as it finishes (`poll`): continuous batching.

Engines know the model and its tokenizer; they know nothing of the cache, gRPC or admission.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.sampling import Sampling
from asyncopd.weightsync.receive import WeightStream


@dataclass(frozen=True)
class EngineInfo:
    """What a caller needs to know to validate requests for an engine."""

    name: str  # transformers | vllm
    vocab_size: int
    max_model_len: int  # prompt + response tokens one sequence may hold
    eos_token_id: int | None


class Engine(abc.ABC):
    """A student inference engine: generation with behaviour log-probs, support and versions."""

    info: EngineInfo

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """Policy version of the weights loaded now."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int
    ) -> list[Rollout]:
        """One rollout per prompt, in order. Raises ValueError for requests it cannot serve."""

    @abc.abstractmethod
    def load_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace (some of) the weights, HF parameter names; tokens after the return carry `version`."""

    @abc.abstractmethod
    def param_shapes(self) -> dict[str, torch.Size]:
        """The HF parameter names `load_weights` accepts, with their shapes."""

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Release the engine's resources."""

    # Continuous generation: engines that can admit requests while others decode (vLLM) keep
    # themselves full; the others only generate whole batches.

    @property
    def streaming(self) -> bool:
        """Whether `submit` / `poll` / `abort_submitted` are available."""
        return False

    def submit(self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int) -> None:
        """Start generating `prompts` (validated first: ValueError names the field); their rollouts
        come back from `poll` as each finishes, in finishing order."""
        raise NotImplementedError(f"the {self.info.name} engine generates whole batches only")

    def poll(self) -> list[Rollout]:
        """Advance the submitted requests by one decode step; the rollouts that finished."""
        raise NotImplementedError(f"the {self.info.name} engine generates whole batches only")

    @property
    def in_flight(self) -> int:
        """Submitted requests not yet returned by `poll`."""
        return 0

    def abort_submitted(self) -> list[Prompt]:
        """Stop every submitted request; their prompts (to give the tickets back)."""
        return []

    def check_request(self, prompts: Sequence[Prompt], support_kind: SupportKind, k: int) -> None:
        """Reject what no engine can serve, before any work is done (ValueError names the field)."""
        info = self.info
        if support_kind == SupportKind.STUDENT_TOPK and not 1 <= k <= info.vocab_size:
            raise ValueError(f"support_k: {k} must be in 1..{info.vocab_size} (the vocabulary size) for STUDENT_TOPK")
        if support_kind == SupportKind.MC_SAMPLES and k < 1:
            # Draws are with replacement: N may exceed the vocabulary.
            raise ValueError(f"support_k: {k} must be >= 1 for MC_SAMPLES")
        for i, p in enumerate(prompts):
            ids = np.asarray(p.prompt_ids)
            if ids.ndim != 1 or ids.shape[0] == 0:
                raise ValueError(f"prompts[{i}].prompt_ids: must be a non-empty 1-D list of token ids")
            if int(ids.min()) < 0 or int(ids.max()) >= info.vocab_size:
                raise ValueError(
                    f"prompts[{i}].prompt_ids: token ids must be in 0..{info.vocab_size - 1}, "
                    f"got {int(ids.min())}..{int(ids.max())}"
                )
            if ids.shape[0] >= info.max_model_len:
                raise ValueError(
                    f"prompts[{i}].prompt_ids: {ids.shape[0]} tokens leave no room to generate "
                    f"(max_model_len {info.max_model_len})"
                )


def check_weights(
    version: int, current: int, named_tensors: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, torch.Size]
) -> Iterable[tuple[str, torch.Tensor]]:
    """Validate an update completely before anything is applied (so a bad update changes nothing).

    A `WeightStream` (weight sync's receive path) is checked by the names and shapes it
    announces and handed back unconsumed: its tensors arrive while the engine loads the ones
    before, through two reused buffers, so the engine must copy each as it comes (never list them)."""
    if version < current:
        raise ValueError(f"weights version {version} is older than the loaded version {current}")
    if isinstance(named_tensors, WeightStream):
        _check_shapes(named_tensors.specs, shapes)
        return named_tensors
    tensors = list(named_tensors)
    _check_shapes([(name, tuple(t.shape)) for name, t in tensors], shapes)
    return tensors


def _check_shapes(specs: Iterable[tuple[str, tuple[int, ...]]], shapes: dict[str, torch.Size]) -> None:
    for name, shape in specs:
        if name not in shapes:
            raise ValueError(f"weights: unknown parameter {name!r}")
        if tuple(shape) != tuple(shapes[name]):
            raise ValueError(f"weights: {name} has shape {tuple(shape)}, expected {tuple(shapes[name])}")


class StopChecker:
    """Decides when a response is finished by content: EOS, or a stop string in the decoded tail
    (the length limit is the caller's)."""

    def __init__(self, tokenizer: object, stop: Sequence[str], eos_token_id: int | None) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._eos = eos_token_id
        # Decoding only the tail keeps the check O(1) per token; a token decodes to >= 1 char.
        self._window = max((len(s) for s in self._stop), default=0) + 2

    def finished(self, response: Sequence[int]) -> bool:
        if self._eos is not None and response and response[-1] == self._eos:
            return True
        if not self._stop:
            return False
        text = self._tokenizer.decode(list(response[-self._window :]), skip_special_tokens=False)  # type: ignore[attr-defined]
        return any(s in text for s in self._stop)


def build_rollout(
    prompt: Prompt,
    *,
    response: Sequence[int],
    logprobs: Sequence[float],
    versions: Sequence[int],
    support: tuple[np.ndarray, np.ndarray] | None,
    support_kind: SupportKind,
    replica: str,
    truncated: bool,
) -> Rollout:
    """Assemble a rollout; the sample id is derived from the admission ticket when there is one."""
    stem = prompt.ticket or prompt.prompt_id
    return Rollout(
        sample_id=f"{stem}:{uuid.uuid4().hex[:12]}",
        prompt_id=prompt.prompt_id,
        ticket=prompt.ticket,
        task=prompt.task,
        prompt_ids=np.asarray(prompt.prompt_ids, dtype=np.int32),
        response_ids=np.asarray(response, dtype=np.int32),
        behavior_logprobs=np.asarray(logprobs, dtype=np.float32),
        versions=np.asarray(versions, dtype=np.int32),
        support_kind=support_kind if support is not None else SupportKind.NONE,
        support_ids=None if support is None else support[0].astype(np.int32),
        support_logprobs=None if support is None else support[1].astype(np.float32),
        replica=replica,
        truncated=truncated,
        created_unix=time.time(),
    )
