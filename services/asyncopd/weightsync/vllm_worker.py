"""vLLM's side of a weight update: a worker extension every vLLM worker of a rollout engine gets.

vLLM mixes the class named by `worker_extension_cls` into each of its workers — one per
tensor-parallel rank — and `LLM.collective_rpc("name", args=...)` calls a method of it on every
worker. The rollout engine (`asyncopd.rollout.vllm_engine`) drives one update as

    weightsync_begin        once
    weightsync_load_bucket  once per received bucket, with that bucket's (HF name, full tensor) list
    weightsync_finish       once

(prefixed names: vLLM's workers have their own `start_weight_update` / `update_weights` /
`finish_weight_update` for its weight-transfer engines), and every worker loads its own shard of
each full tensor: `model.load_weights` hands a tensor to its parameter's `weight_loader`, which
narrows it to this worker's tensor-parallel rank (and packs q/k/v and gate/up into the fused
parameters). Nothing here assumes a tensor-parallel size.
Around the buckets, `begin`/`finish` do what vLLM's own `reload_weights` does around one
iterator (layer-wise reload: the layers are restored to their checkpoint form, loaded, then
processed back into kernel form), so a weight update can arrive in pieces instead of as one
iterator that a multi-process executor could not carry.

vLLM's layer-wise reload keeps a reference to every tensor it is given until the tensor's layer
is complete, and some layers only at the end (a padded vocabulary's embedding, attention
layers). The tensors of a received bucket are views into buffers the next bucket reuses, so a
worker copies each bucket first: a bucket's copy lives until its layers are processed (one
bucket for most layers; with tensor parallelism the executor's pickling already made one).

It knows vLLM's worker and model loader; it knows nothing of process groups or the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

WORKER_EXTENSION = f"{__name__}.WeightSyncWorker"
"""The `worker_extension_cls` value for `vllm.LLM(...)`."""


class WeightSyncWorker:
    """Mixed into every vLLM worker (`self` is the worker: `self.model_runner` holds the model)."""

    model_runner: Any

    def weightsync_begin(self) -> int:
        """Start one update on this worker; returns its tensor-parallel rank (tests read it)."""
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())
        return int(get_tensor_model_parallel_rank())

    def weightsync_load_bucket(self, named: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load this worker's shard of every full tensor in `named` (copied first: the module doc);
        returns how many were given."""
        self.model_runner.get_model().load_weights(weights=[(name, t.clone()) for name, t in named])
        return len(named)

    def weightsync_finish(self) -> None:
        """Process the loaded layers into kernel form and drop state derived from the old weights."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            getattr(runner, reset, lambda: None)()
