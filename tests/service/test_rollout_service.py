"""The rollout replica over real gRPC (transformers engine, shipped toy student), and its cache
loop against a real cache service on Redis together with a real teacher loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from asyncopd.cache.main import start_cache
from asyncopd.config.endpoints import ServerConfig
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.observability import metrics
from asyncopd.records import Prompt, SupportKind, TaskInfo
from asyncopd.rollout.replica import RolloutLoop, RolloutReplica
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.servicer import SERVICE_NAME, RolloutServicer
from asyncopd.rollout.transformers_engine import TransformersEngine
from asyncopd.tasks import load_toy_dataset
from asyncopd.teacher.replica import TeacherLoop, TeacherReplica
from asyncopd.teacher.scorer import TeacherScorer
from asyncopd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from asyncopd.wire import Limits, encode, prompt_to_proto
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rollout_client import RolloutClient
from asyncopd.wire.rpc import channel, start_server
from rollout_checks import toy_prompts
from test_cache_harness import make_config, unique_prefix, wipe

pytestmark = pytest.mark.service

STUDENT = "assets/toy-student"
TEACHER = "assets/toy-teacher"
DEFAULT = Sampling(temperature=1.0, max_tokens=12, stop=("\n",))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[RolloutReplica, grpc.Channel]]:
    engine = TransformersEngine(load_model(STUDENT), load_tokenizer(STUDENT), "rollout-test")
    registry = metrics.ServiceRegistry("rollout", "rollout-test", process_metrics=False)
    replica = RolloutReplica(engine, "rollout-test", metrics.RolloutMetrics(registry))
    servicer = RolloutServicer(replica, DEFAULT)
    server = start_server(
        ServerConfig(port=0),
        [lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
    )
    ch = channel(server.address)
    try:
        yield replica, ch
    finally:
        ch.close()
        server.stop(grace=0.5)


def test_generate_over_grpc_returns_valid_rollouts_and_status_counts_them(
    served: tuple[RolloutReplica, grpc.Channel],
) -> None:
    _, ch = served
    client = RolloutClient(ch, Limits(vocab_size=32))
    before = client.status().generated_tokens
    prompts = toy_prompts(load_tokenizer(STUDENT))
    rollouts = client.generate(
        prompts, temperature=0.8, top_p=0.9, max_tokens=10, seed=2, support_kind=SupportKind.MC_SAMPLES, support_k=3
    )
    assert [r.prompt_id for r in rollouts] == [p.prompt_id for p in prompts]
    for r, p in zip(rollouts, prompts, strict=True):
        np.testing.assert_array_equal(r.prompt_ids, p.prompt_ids)
        assert 1 <= r.num_tokens <= 10 and r.support_ids is not None and r.support_ids.shape == (r.num_tokens, 3)
        assert r.replica == "rollout-test" and r.ticket == p.ticket
    status = client.status()
    assert status.engine == "transformers" and status.replica == "rollout-test" and not status.paused
    assert status.generated_tokens - before == sum(r.num_tokens for r in rollouts)
    assert status.tokens_per_second > 0
    defaults = client.generate(prompts[:1], temperature=1.0)  # max_tokens 0 = the replica's default
    assert defaults[0].num_tokens <= DEFAULT.max_tokens


def test_push_weights_over_grpc_sets_the_version_on_new_tokens(served: tuple[RolloutReplica, grpc.Channel]) -> None:
    replica, ch = served
    client = RolloutClient(ch)
    model = load_model(STUDENT)
    version = replica.engine.version + 1  # one past what it holds: the most a replica takes on its own
    assert client.push_weights(version, list(model.state_dict().items())) == len(model.state_dict())
    assert client.status().version == version
    rollouts = client.generate(toy_prompts(load_tokenizer(STUDENT))[:2], temperature=1.0, max_tokens=4)
    assert all((r.versions == version).all() for r in rollouts)


def _prompt(ids: list[int]) -> common_pb2.Prompt:
    return prompt_to_proto(Prompt("p", np.asarray(ids, dtype=np.int32), TaskInfo("toy", "1")))


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (rollout_pb2.GenerateRequest(), "at least one prompt"),
        (rollout_pb2.GenerateRequest(prompts=[_prompt([])]), "at least one token"),
        (rollout_pb2.GenerateRequest(prompts=[_prompt([5] * 128)]), "exceed the limit"),
        (rollout_pb2.GenerateRequest(prompts=[_prompt([5, 32])]), "outside the vocabulary"),
        (rollout_pb2.GenerateRequest(prompts=[_prompt([5, -1])]), "negative token id"),
        (
            rollout_pb2.GenerateRequest(
                prompts=[_prompt([5])], support_kind=common_pb2.SUPPORT_STUDENT_TOPK, support_k=33
            ),
            "support_k",
        ),
        (
            rollout_pb2.GenerateRequest(prompts=[_prompt([5])], support_kind=common_pb2.SUPPORT_MC_SAMPLES),
            "support_k",
        ),
        (
            rollout_pb2.GenerateRequest(prompts=[_prompt([5])], sampling=rollout_pb2.SamplingParams(temperature=0)),
            "temperature",
        ),
        (
            rollout_pb2.GenerateRequest(
                prompts=[_prompt([5])], sampling=rollout_pb2.SamplingParams(temperature=1, top_p=1.5)
            ),
            "top_p",
        ),
    ],
)
def test_bad_generate_requests_are_invalid_argument(
    served: tuple[RolloutReplica, grpc.Channel], request_: rollout_pb2.GenerateRequest, needle: str
) -> None:
    _, ch = served
    stub = rollout_pb2_grpc.RolloutServiceStub(ch)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert needle in info.value.details()


def test_bad_weight_push_is_invalid_argument_and_changes_nothing(served: tuple[RolloutReplica, grpc.Channel]) -> None:
    replica, ch = served
    stub = rollout_pb2_grpc.RolloutServiceStub(ch)
    before = replica.engine.version
    chunks = [rollout_pb2.WeightChunk(version=before + 1, name="nope", tensor=encode(torch.zeros(2)), last=True)]
    with pytest.raises(grpc.RpcError) as info:
        stub.PushWeights(iter(chunks), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown parameter" in info.value.details()
    assert replica.engine.version == before


def test_rollout_and_teacher_loops_fill_the_cache_with_scored_samples() -> None:
    """Real cache service on Redis: rollouts acquired → generated → scored → pulled as a batch."""
    tokenizer = load_tokenizer(STUDENT)
    prefix = unique_prefix("rollout-loop")
    config = make_config(prefix, max_staleness=0, **{"learner.batch_size": 4})
    items = list(load_toy_dataset("train", 12, 0))
    cache = start_cache(
        config,
        "cache-rollout-test",
        prompts=items,
        tokenize=tokenizer.encode,
        vocab_size=32,
        serve_metrics=False,
    )
    ch = channel(cache.address)
    stop = threading.Event()
    try:
        engine = TransformersEngine(load_model(STUDENT), tokenizer, "rollout-0")
        replica = RolloutReplica(engine, "rollout-0")
        loop = RolloutLoop(
            replica,
            CacheClient(ch),
            sampling=DEFAULT,
            support_kind=SupportKind.MC_SAMPLES,
            k=4,
            batch_size=8,
            wait_ms=200,
        )
        teacher = TeacherReplica(TeacherScorer(load_model(TEACHER), "teacher-0"), "teacher-0")
        teacher_loop = TeacherLoop(teacher, CacheClient(ch), topk=3, tail=True, claim_batch=8, wait_ms=200)
        errors: list[BaseException] = []

        def run(target: object) -> threading.Thread:
            def body() -> None:
                try:
                    target.run(stop)  # type: ignore[attr-defined]
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=body, daemon=True)
            thread.start()
            return thread

        rollout_thread, teacher_thread = run(loop), run(teacher_loop)
        client = CacheClient(ch)
        batch = client.pull_batch(4, 0, wait_ms=60000)
        assert not errors, errors
        assert batch is not None and len(batch.samples) == 4 and batch.staleness == [0, 0, 0, 0]
        for s in batch.samples:
            r, sc = s.rollout, s.scores
            assert r.replica == "rollout-0" and sc.teacher == "teacher-0"
            assert (r.versions == 0).all() and r.support_ids is not None and r.support_ids.shape[1] == 4
            assert sc.topk_ids is not None and sc.topk_ids.shape == (r.num_tokens, 3)
            assert sc.support_logprobs is not None and sc.support_logprobs.shape == (r.num_tokens, 4)
            assert sc.tail_logmass is not None
        assert client.ack_batch(batch.batch_id) == 4
        client.publish_version(1, finished=True)
        rollout_thread.join(timeout=60)
        assert not rollout_thread.is_alive(), "the rollout loop exits when the cache says finished"
        assert loop.rollouts_put >= 4
        stop.set()
        teacher_thread.join(timeout=30)
        assert not errors, errors
        assert client.stats_snapshot().invariant_holds()
    finally:
        stop.set()
        ch.close()
        cache.stop(grace=0.5)
        wipe(config.redis.url, config.redis.key_prefix)
