"""Continuous rollout with the vLLM engine: requests are admitted while others decode, each
rollout comes back when it finishes (short ones before the longest is done), a weight update
lands between decode steps (per-token versions change inside a response, or with pause_mode
abort the unfinished responses restart under the new weights), and the replica's loop puts
rollouts as they finish and refills free slots from the cache."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from asyncopd.models.loading import load_tokenizer
from asyncopd.models.vllm_env import vllm_available
from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.replica import RolloutLoop, RolloutReplica
from asyncopd.rollout.sampling import Sampling
from rollout_checks import toy_prompts
from tiny_models import make_tiny_qwen3
from transformers import AutoModelForCausalLM

if not vllm_available() and not os.environ.get("CI"):
    pytest.skip("vllm(-cpu) is not installed (CI installs it and runs these tests)", allow_module_level=True)

from asyncopd.rollout.vllm_engine import VLLMEngine

pytestmark = [pytest.mark.service, pytest.mark.vllm]

PROMPTS = ("Q:1+", "Q:2*3=", "Q:7-", "Q:9+9=")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("continuous") / "student", seed=4)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[VLLMEngine]:
    eng = VLLMEngine(str(model_dir), "cont-0", max_model_len=128, seed=0)
    yield eng
    eng.close()


def weights(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    return list(AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())


def prompts(model_dir: Path, tag: str) -> list[Prompt]:
    return [
        Prompt(prompt_id=f"{tag}{p.prompt_id}", prompt_ids=p.prompt_ids, task=p.task, ticket=f"{tag}{p.ticket}")
        for p in toy_prompts(load_tokenizer(str(model_dir)), PROMPTS)
    ]


def test_short_responses_return_first_and_versions_change_mid_response(engine: VLLMEngine, model_dir: Path) -> None:
    long_sampling = Sampling(temperature=1.0, max_tokens=100, stop=(), seed=21)
    engine.submit(prompts(model_dir, "long"), long_sampling, SupportKind.MC_SAMPLES, 4)
    engine.submit(prompts(model_dir, "short"), Sampling(max_tokens=3, stop=(), seed=22), SupportKind.MC_SAMPLES, 4)
    returned: list[tuple[int, Rollout]] = []
    step, late_submitted = 0, False
    version = engine.version + 1
    all_weights = weights(model_dir)
    while engine.in_flight:
        step += 1
        if step == 6:
            engine.load_weights(version, all_weights)  # between two decode steps
        done = engine.poll()
        returned.extend((step, r) for r in done)
        if step >= 6 and not late_submitted:  # admitted while the long responses decode
            engine.submit(prompts(model_dir, "late"), Sampling(max_tokens=5, stop=(), seed=23), SupportKind.NONE, 0)
            late_submitted = True
    by_id = {r.prompt_id: (s, r) for s, r in returned}
    assert len(by_id) == 12
    longest_step, longest = max((by_id[p] for p in by_id if p.startswith("long")), key=lambda sr: sr[1].num_tokens)
    assert longest.num_tokens > 20, "the seed gives one long response"
    for p, (s, r) in by_id.items():
        if p.startswith(("short", "late")):
            assert s < longest_step, f"{p} came back at step {s}, only when the longest finished ({longest_step})"
        assert r.support_ids is None or r.support_ids.shape == (r.num_tokens, 4)
    # The weight update landed mid-response: the first 5 tokens are the old version, the rest new.
    assert longest.versions[0] == version - 1 and longest.versions[-1] == version, longest.versions
    assert (np.diff(longest.versions) >= 0).all()
    late = [r for p, (_, r) in by_id.items() if p.startswith("late")]
    assert all((r.versions == version).all() for r in late), "admitted after the update"


def test_pause_mode_abort_restarts_unfinished_responses(engine: VLLMEngine, model_dir: Path) -> None:
    # One engine per process: vLLM's parallel state is global, closing a second engine breaks the first.
    eng = engine
    eng.pause_mode = "abort"
    version = eng.version + 1
    try:
        eng.submit(prompts(model_dir, "a"), Sampling(max_tokens=100, stop=(), seed=21), SupportKind.NONE, 0)
        finished_before: list[Rollout] = []
        for _ in range(5):
            finished_before.extend(eng.poll())
        eng.load_weights(version, weights(model_dir))
        after: list[Rollout] = []
        while eng.in_flight:
            after.extend(eng.poll())
    finally:
        eng.pause_mode = "keep"
    assert len(finished_before) + len(after) == len(PROMPTS)
    assert any(r.num_tokens > 5 for r in after), "some response was still decoding at the update"
    for r in after:
        assert (r.versions == version).all(), "an aborted response restarts wholly under the new weights"
    for r in finished_before:
        assert (r.versions == version - 1).all()


class FakeCache:
    """The cache client surface the rollout loop uses, from a list of prompts."""

    def __init__(self, queue: list[Prompt]) -> None:
        self.queue = list(queue)
        self.puts: list[list[Rollout]] = []
        self.asked: list[int] = []
        self.released: list[str] = []
        self.lock = threading.Lock()

    def acquire_prompts(self, replica: str, max_prompts: int, wait_ms: int = 0) -> tuple[list[Prompt], int, bool]:
        with self.lock:
            self.asked.append(max_prompts)
            out, self.queue = self.queue[:max_prompts], self.queue[max_prompts:]
            return out, 0, not out and not self.queue

    def put_rollouts(self, rollouts: Sequence[Rollout]) -> None:
        self.puts.append(list(rollouts))

    def release_prompts(self, replica: str, tickets: Sequence[str]) -> int:
        self.released.extend(tickets)
        return len(tickets)


def test_loop_puts_each_rollout_as_it_finishes_and_refills_slots(engine: VLLMEngine, model_dir: Path) -> None:
    queue = [p for tag in "abc" for p in prompts(model_dir, tag)]  # 12 prompts, 4 slots
    cache = FakeCache(queue)
    replica = RolloutReplica(engine, "cont-0")
    loop = RolloutLoop(
        replica,
        cache,  # type: ignore[arg-type]
        sampling=Sampling(temperature=1.0, max_tokens=40, stop=(), seed=5),
        support_kind=SupportKind.STUDENT_TOPK,
        k=2,
        batch_size=4,
        wait_ms=0,
    )
    loop.run(threading.Event())  # returns when the fake cache reports the run finished
    put = [r.prompt_id for batch in cache.puts for r in batch]
    assert sorted(put) == sorted(p.prompt_id for p in queue)
    assert len(cache.puts) > 3, "not 3 batch-synchronous puts of 4: rollouts went out as they finished"
    assert max(cache.asked) <= 4 and any(n < 4 for n in cache.asked), "free slots were refilled mid-decode"
    assert not cache.released and engine.in_flight == 0


def test_stopping_the_loop_gives_unfinished_tickets_back(engine: VLLMEngine, model_dir: Path) -> None:
    cache = FakeCache(prompts(model_dir, "s"))
    stop = threading.Event()
    replica = RolloutReplica(engine, "cont-0")
    poll = replica.poll

    def poll_then_stop() -> list[Rollout]:
        stop.set()  # stop after the first decode step: everything is still in flight
        return poll()

    replica.poll = poll_then_stop  # type: ignore[method-assign]
    loop = RolloutLoop(
        replica,
        cache,  # type: ignore[arg-type]
        sampling=Sampling(max_tokens=100, stop=(), seed=6),
        support_kind=SupportKind.NONE,
        k=0,
        batch_size=4,
        wait_ms=0,
    )
    loop.run(stop)
    delivered = {r.ticket for batch in cache.puts for r in batch}
    assert delivered | set(cache.released) == {p.ticket for p in prompts(model_dir, "s")}
    assert cache.released and engine.in_flight == 0
