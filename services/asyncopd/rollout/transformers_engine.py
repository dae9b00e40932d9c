"""The transformers rollout engine: batched sampling with a KV cache on any HF causal LM.

The light fallback next to vLLM, and the reference the vLLM engine is checked against. Prompts
are left-padded into one batch; a prefill pass fills the KV cache, then one decode step per
token. Each step samples from μ (`rollout.sampling`) and records the token, log μ(token), the
version of the weights that computed the logits, and the support.

Weight updates take the same lock as a decode step, so a switch lands between two steps: the
tokens after it carry the new version (their KV cache still holds keys/values the old weights
computed, as in every in-flight weight update). This module knows transformers and torch; it
knows nothing of the cache, gRPC or admission.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.engine import Engine, EngineInfo, StopChecker, build_rollout, check_weights
from asyncopd.rollout.sampling import Sampling, behaviour_logprobs, draw_support, sample


class TransformersEngine(Engine):
    """Generation with a transformers model held in this process."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        replica: str = "",
        *,
        version: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._replica = replica
        self._version = version
        self._lock = threading.Lock()
        self._device = next(model.parameters()).device
        config = model.config
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or 4096
        vocab = int(config.vocab_size)
        eos = tokenizer.eos_token_id
        self.info = EngineInfo(
            name="transformers",
            vocab_size=vocab,
            max_model_len=min(max_model_len or limit, limit),
            eos_token_id=None if eos is None else int(eos),
        )
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos or 0)
        self._shapes = {name: t.shape for name, t in model.state_dict().items()}

    @property
    def version(self) -> int:
        return self._version

    def param_shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def load_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = check_weights(version, self._version, named_tensors, self._shapes)
        with self._lock, torch.no_grad():
            state = self._model.state_dict()
            for name, tensor in tensors:
                state[name].copy_(tensor.to(device=state[name].device, dtype=state[name].dtype))
            self._version = version

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: object
    ) -> tuple[torch.Tensor, object, int]:
        """One forward under the weight lock: last-position logits, the cache, the weights' version."""
        with self._lock, torch.no_grad():
            out = self._model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            return out.logits[:, -1, :].float(), out.past_key_values, self._version

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int
    ) -> list[Rollout]:
        self.check_request(prompts, support_kind, k)
        if not prompts:
            return []
        generator = None
        if sampling.seed:
            generator = torch.Generator(device=self._device).manual_seed(sampling.seed)
        lengths = [len(p.prompt_ids) for p in prompts]
        width = max(lengths)
        batch = len(prompts)
        ids = torch.full((batch, width), self._pad_id, dtype=torch.long, device=self._device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=self._device)
        for row, p in enumerate(prompts):
            ids[row, width - lengths[row] :] = torch.from_numpy(np.array(p.prompt_ids, dtype=np.int64))
            mask[row, width - lengths[row] :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        limits = [min(sampling.max_tokens, self.info.max_model_len - n) for n in lengths]
        stop = StopChecker(self._tokenizer, sampling.stop, self.info.eos_token_id)

        responses: list[list[int]] = [[] for _ in prompts]
        logps: list[list[float]] = [[] for _ in prompts]
        versions: list[list[int]] = [[] for _ in prompts]
        support_rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in prompts]
        done = [False] * batch
        truncated = [False] * batch

        logits, cache, version = self._forward(ids, mask, pos, None)
        next_pos = pos[:, -1:] + 1
        while True:
            logmu = behaviour_logprobs(logits, sampling)
            tokens = logmu.argmax(-1) if sampling.greedy else sample(logmu, generator)
            token_logmu = logmu.gather(-1, tokens[:, None]).squeeze(-1)
            support = draw_support(logmu, tokens, support_kind, k, generator)
            tok_np, lp_np = tokens.cpu().numpy(), token_logmu.cpu().numpy()
            sup_np = None if support is None else (support[0].cpu().numpy(), support[1].cpu().numpy())
            for row in range(batch):
                if done[row]:
                    continue
                responses[row].append(int(tok_np[row]))
                logps[row].append(float(lp_np[row]))
                versions[row].append(version)
                if sup_np is not None:
                    support_rows[row].append((sup_np[0][row], sup_np[1][row]))
                if stop.finished(responses[row]):
                    done[row] = True
                elif len(responses[row]) >= limits[row]:
                    done[row] = truncated[row] = True
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=self._device)], dim=-1)
            logits, cache, version = self._forward(tokens[:, None], mask, next_pos, cache)
            next_pos = next_pos + 1

        rollouts = []
        for row, p in enumerate(prompts):
            sup = None
            if support_rows[row]:
                sup = (np.stack([s[0] for s in support_rows[row]]), np.stack([s[1] for s in support_rows[row]]))
            rollouts.append(
                build_rollout(
                    p,
                    response=responses[row],
                    logprobs=logps[row],
                    versions=versions[row],
                    support=sup,
                    support_kind=support_kind,
                    replica=self._replica,
                    truncated=truncated[row],
                )
            )
        return rollouts
