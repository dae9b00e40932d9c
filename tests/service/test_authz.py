"""Per-method authorisation on real mutual-TLS servers (loopback, certificates made by openssl
here): each component role holds its own certificate (URI SAN spiffe://asyncopd/<role>, or DNS
SAN <role>.asyncopd), and the attacks reproduced in issue 20 from a pod of the wrong role are
refused with PERMISSION_DENIED and change nothing:

- PullBatch(learner_version=2**53) from a rollout (would publish that version and lock the
  real learner out),
- PublishVersion(finished=true) from a teacher (would end prompt admission),
- PushWeights (version 1e9) from a rollout into another rollout replica,
- RegisterReplica from a teacher (would make the learner stream weights to any address).

The rightful role is served by the same servers, and read-only methods (Stats, Status, health)
serve any authenticated peer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from asyncopd.cache.main import start_cache
from asyncopd.config import config_from_dict
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME as LEARNER_SERVICE
from asyncopd.learner.servicer import LearnerServicer, Progress, add_to_server
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.observability import metrics
from asyncopd.rollout.replica import RolloutReplica
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.servicer import SERVICE_NAME as ROLLOUT_SERVICE
from asyncopd.rollout.servicer import RolloutServicer
from asyncopd.rollout.transformers_engine import TransformersEngine
from asyncopd.v1 import cache_pb2, cache_pb2_grpc, learner_pb2, learner_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from asyncopd.weightsync.grpc_transport import GrpcPush, chunks
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rollout_client import RolloutClient
from asyncopd.wire.rpc import channel, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from required_tools import require_tool
from test_cache_harness import SHARED_REDIS, VOCAB, tiny_prompts, tokenize, unique_prefix, wipe
from test_tls import make_ca, make_cert

pytestmark = pytest.mark.service

STUDENT = "assets/toy-student"
# Role certificates: the chart's form (URI SAN) for most, the DNS form for the teacher.
ROLE_SANS = {
    "learner": "URI:spiffe://asyncopd/learner",
    "rollout": "URI:spiffe://asyncopd/rollout",
    "teacher": "DNS:teacher.asyncopd",
    "autoscaler": "URI:spiffe://asyncopd/autoscaler",
    "nobody": "DNS:client",  # signed by the CA, but names no role
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    for role, san in ROLE_SANS.items():
        make_cert(d, "ca", role, san)
    return d


def tls(d: Path, who: str) -> TLSConfig:
    crt, key, ca = (str(d / f) for f in (f"{who}.crt", f"{who}.key", "ca.crt"))
    return TLSConfig(enabled=True, cert_file=crt, key_file=key, ca_file=ca)


@dataclass
class Servers:
    pki: Path
    cache: str
    learner: str
    rollout: str
    replica: RolloutReplica
    weights: GrpcPush

    def as_(self, role: str, address: str) -> grpc.Channel:
        return channel(address, tls=tls(self.pki, role))


@pytest.fixture(scope="module")
def servers(pki: Path) -> Iterator[Servers]:
    prefix = unique_prefix("authz")
    server_tls = tls(pki, "server")
    config = config_from_dict(
        {
            "redis": {"url": SHARED_REDIS, "key_prefix": prefix},
            "cache": {"server": {"port": 0}, "hold_until_learner": False},  # no learner begins here
            "tls": server_tls.model_dump(),
        }
    )
    cache = start_cache(
        config, "cache-authz", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB, serve_metrics=False
    )
    weights = GrpcPush(WeightSyncConfig(timeout_s=10.0))
    learner = start_server(
        ServerConfig(port=0), [add_to_server(LearnerServicer(weights, Progress))], [LEARNER_SERVICE], server_tls
    )
    engine = TransformersEngine(load_model(STUDENT), load_tokenizer(STUDENT), "rollout-authz")
    registry = metrics.ServiceRegistry("rollout", "rollout-authz", process_metrics=False)
    replica = RolloutReplica(engine, "rollout-authz", metrics.RolloutMetrics(registry))
    servicer = RolloutServicer(replica, Sampling(max_tokens=4))
    rollout = start_server(
        ServerConfig(port=0),
        [lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s)],
        [ROLLOUT_SERVICE],
        server_tls,
    )
    try:
        yield Servers(pki, cache.address, learner.address, rollout.address, replica, weights)
    finally:
        rollout.stop(grace=0.5)
        learner.stop(grace=0.5)
        weights.close()
        cache.stop(grace=0.5)
        wipe(SHARED_REDIS, prefix)


def denied(call: object, *names: str) -> grpc.RpcError:
    """`call()` must fail with PERMISSION_DENIED and a message naming each of `names`."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    err = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    for name in names:
        assert name in (err.details() or ""), (name, err.details())
    return err


def cache_stub(s: Servers, role: str) -> cache_pb2_grpc.CacheServiceStub:
    return cache_pb2_grpc.CacheServiceStub(s.as_(role, s.cache))


def published(s: Servers) -> tuple[int, bool]:
    r = cache_stub(s, "autoscaler").Stats(cache_pb2.StatsRequest(), timeout=10)
    return int(r.learner_version), bool(r.finished)


def test_pull_batch_with_a_huge_version_from_a_rollout_is_refused_and_publishes_nothing(servers: Servers) -> None:
    before = published(servers)
    attack = cache_pb2.PullBatchRequest(size=1, learner_version=2**53, learner="rogue")
    denied(lambda: cache_stub(servers, "rollout").PullBatch(attack, timeout=10), "rollout", "PullBatch")
    assert published(servers) == before
    # The real learner still publishes its own next version.
    learner = CacheClient(servers.as_("learner", servers.cache))
    assert learner.publish_version(before[0] + 1) == before[0] + 1
    assert learner.pull_batch(1, before[0] + 1) is None  # nothing scored yet: an empty pull, not a refusal


def test_publish_finished_from_a_teacher_is_refused_and_admission_goes_on(servers: Servers) -> None:
    version, finished = published(servers)
    assert not finished
    attack = cache_pb2.PublishVersionRequest(version=version + 1, finished=True)
    denied(lambda: cache_stub(servers, "teacher").PublishVersion(attack, timeout=10), "teacher", "PublishVersion")
    assert published(servers) == (version, False)
    prompts, _, done = CacheClient(servers.as_("rollout", servers.cache)).acquire_prompts("r0", 2)
    assert prompts and not done


def test_push_weights_from_a_rollout_is_refused_and_the_replica_keeps_its_weights(servers: Servers) -> None:
    engine = servers.replica.engine
    before_version = engine.version
    named = [(n, torch.full(shape, float("nan"))) for n, shape in engine.param_shapes().items()]
    stub = rollout_pb2_grpc.RolloutServiceStub(servers.as_("rollout", servers.rollout))
    denied(lambda: stub.PushWeights(chunks(10**9, named), timeout=30), "rollout", "PushWeights")
    assert engine.version == before_version
    # The learner's identity may push (a real update, well-formed).
    learner = RolloutClient(servers.as_("learner", servers.rollout))
    state = {n: torch.zeros(shape) for n, shape in engine.param_shapes().items()}
    assert learner.push_weights(before_version + 1, state.items()) == len(state)
    assert engine.version == before_version + 1


def test_register_replica_from_a_teacher_is_refused(servers: Servers) -> None:
    stub = learner_pb2_grpc.LearnerServiceStub(servers.as_("teacher", servers.learner))
    attack = learner_pb2.RegisterReplicaRequest(replica="evil", address="203.0.113.9:1", collective=False)
    denied(lambda: stub.RegisterReplica(attack, timeout=10), "teacher", "RegisterReplica")
    assert servers.weights.replicas == []


def test_each_role_is_refused_what_is_not_its_own(servers: Servers) -> None:
    put = cache_pb2.PutRolloutsRequest()
    claim = cache_pb2.ClaimRolloutsRequest(teacher="t", max_rollouts=1)
    denied(lambda: cache_stub(servers, "learner").PutRollouts(put, timeout=10), "learner", "PutRollouts")
    denied(lambda: cache_stub(servers, "rollout").ClaimRollouts(claim, timeout=10), "rollout", "ClaimRollouts")
    denied(
        lambda: cache_stub(servers, "autoscaler").AckBatch(cache_pb2.AckBatchRequest(batch_id="b"), timeout=10),
        "autoscaler",
        "AckBatch",
    )
    denied(
        lambda: cache_stub(servers, "nobody").AcquirePrompts(
            cache_pb2.AcquirePromptsRequest(replica="x", max_prompts=1), timeout=10
        ),
        "without a role",
        "AcquirePrompts",
    )
    # The teacher's own method goes through (DNS-SAN form of the role).
    CacheClient(servers.as_("teacher", servers.cache)).claim_rollouts("t0", 1)


def test_read_only_methods_serve_any_authenticated_peer(servers: Servers) -> None:
    for role in ROLE_SANS:
        assert cache_stub(servers, role).Stats(cache_pb2.StatsRequest(), timeout=10).max_staleness >= 0
        health = health_pb2_grpc.HealthStub(servers.as_(role, servers.learner))
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        learner = learner_pb2_grpc.LearnerServiceStub(servers.as_(role, servers.learner))
        learner.Status(learner_pb2.LearnerStatusRequest(), timeout=10)
        rollout = rollout_pb2_grpc.RolloutServiceStub(servers.as_(role, servers.rollout))
        assert rollout.Status(rollout_pb2.RolloutStatusRequest(), timeout=10).replica == "rollout-authz"


def test_a_server_without_tls_says_authorisation_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncopd.wire.rpc")
    plain = start_server(ServerConfig(port=0), [], [])
    plain.stop(grace=0)
    assert "authorisation is OFF" in caplog.text
