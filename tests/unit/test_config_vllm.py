"""rollout.vllm: the engine settings reach vLLM's `LLM(...)`, and bad values name the field."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from asyncopd.config import ConfigError, load_config
from asyncopd.rollout import main as rollout_main

pytestmark = pytest.mark.unit


class _Stop(Exception):
    pass


def test_settings_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_llm(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Stop  # got what we came for; no engine is built

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=fake_llm))
    config = load_config(
        "configs/toy.yaml",
        [
            "rollout.engine=vllm",
            "rollout.vllm.tensor_parallel_size=2",
            "rollout.vllm.gpu_memory_utilization=0.55",
            "rollout.vllm.max_model_len=1024",
            "rollout.vllm.enforce_eager=true",
            "rollout.vllm.enable_prefix_caching=false",
            "rollout.vllm.dtype=bfloat16",
        ],
    )
    with pytest.raises(_Stop):
        rollout_main.build_engine(config, "r0")
    assert seen["tensor_parallel_size"] == 2
    assert seen["gpu_memory_utilization"] == 0.55
    assert seen["max_model_len"] == 1024
    assert seen["enforce_eager"] is True
    assert seen["enable_prefix_caching"] is False
    assert seen["dtype"] == "bfloat16"
    assert seen["logprobs_mode"] == "processed_logprobs"
    assert seen["disable_log_stats"] is False  # vLLM's engine metrics exist only with stats on


def test_defaults_suit_a_real_model_and_fall_back_to_the_shared_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_llm(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=fake_llm))
    config = load_config("configs/toy.yaml", ["rollout.engine=vllm", "rollout.max_model_len=96"])
    assert config.rollout.vllm.enable_prefix_caching and not config.rollout.vllm.enforce_eager
    with pytest.raises(_Stop):
        rollout_main.build_engine(config, "r0")
    assert seen["dtype"] == config.models.dtype  # None = models.dtype
    assert seen["max_model_len"] == 96  # None = rollout.max_model_len
    assert seen["tensor_parallel_size"] == 1 and seen["gpu_memory_utilization"] == 0.9


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rollout.vllm.tensor_parallel_size=0", "rollout.vllm.tensor_parallel_size"),
        ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization"),
        ("rollout.vllm.max_model_len=1", "rollout.vllm.max_model_len"),
        ("rollout.vllm.dtype=float8", "rollout.vllm.dtype"),
        ("rollout.vllm.enforce_eager=maybe", "rollout.vllm.enforce_eager"),
        ("rollout.vllm.cuda_graphs=true", "rollout.vllm.cuda_graphs"),
    ],
)
def test_bad_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("configs/toy.yaml", [override])
