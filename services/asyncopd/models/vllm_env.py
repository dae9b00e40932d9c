"""The process environment vLLM needs for the in-engine hooks of the rollout and the teacher,
set in one place before vllm is first imported.

Both hooks (`rollout.vllm_sampling`, `teacher.vllm_scoring`) run in the worker through
`collective_rpc` and patch the V1 model runner. The engine core runs in this process so that
`collective_rpc` can carry functions and tensors without serializing them (and the rollout can
reload weights from tensors). Values already set in the environment win, except the engine-core
switch, which the hooks cannot do without.
"""

from __future__ import annotations

import os
from typing import Any

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine core: collective_rpc takes tensors
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # the hooks patch the V1 model runner
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on CPU; vLLM's default takes far too much
    "HF_HUB_OFFLINE": "1",
}


def prepare_vllm_env(user: str) -> None:
    """Set the environment (`user` names the caller in the error)."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError(f"{user} needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine core in this process)")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def engine_args(
    model_path: str,
    *,
    dtype: str,
    seed: int,
    enforce_eager: bool,
    enable_prefix_caching: bool,
    tensor_parallel_size: int,
    gpu_memory_utilization: float | None,
    max_model_len: int | None,
    extra_args: dict[str, Any] | None = None,
    **role_args: Any,
) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments of an engine built from a `VLLMEngineConfig` block, the same
    for the rollout and the teacher; `role_args` are what one role adds, `extra_args` win last.
    Scheduling stays synchronous: the hooks read the step's outputs in step order."""
    args: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "enforce_eager": enforce_eager,
        "seed": seed,
        "async_scheduling": False,
        "enable_prefix_caching": enable_prefix_caching,
        "tensor_parallel_size": tensor_parallel_size,
        **role_args,
    }
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len:
        args["max_model_len"] = max_model_len
    args.update(extra_args or {})
    return args
