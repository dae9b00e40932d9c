"""The authorisation table and the role parser (the servers that enforce them are tested in
tests/service/test_authz.py)."""

from __future__ import annotations

from asyncopd.v1 import cache_pb2, learner_pb2, rollout_pb2, teacher_pb2
from asyncopd.wire.authz import AUTHENTICATED, METHOD_ROLES, ROLES, refusal, roles_of
from grpc_health.v1 import health_pb2


def every_method() -> set[str]:
    out = set()
    for module in (cache_pb2, learner_pb2, rollout_pb2, teacher_pb2, health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return out


def test_every_rpc_of_every_service_has_a_decision_and_nothing_else_does() -> None:
    assert set(METHOD_ROLES) == every_method()
    for method, roles in METHOD_ROLES.items():
        assert roles is AUTHENTICATED or (roles and roles <= ROLES), method


def test_the_run_steering_methods_belong_to_one_role_each() -> None:
    learner_only = ["PullBatch", "AckBatch", "PublishVersion"]
    assert all(METHOD_ROLES[f"/asyncopd.v1.CacheService/{m}"] == {"learner"} for m in learner_only)
    assert METHOD_ROLES["/asyncopd.v1.RolloutService/PushWeights"] == {"learner"}
    assert METHOD_ROLES["/asyncopd.v1.CacheService/PutRollouts"] == {"rollout"}
    assert METHOD_ROLES["/asyncopd.v1.CacheService/AcquirePrompts"] == {"rollout"}
    assert METHOD_ROLES["/asyncopd.v1.CacheService/PutScores"] == {"teacher"}
    assert METHOD_ROLES["/asyncopd.v1.CacheService/ClaimRollouts"] == {"teacher"}
    assert METHOD_ROLES["/asyncopd.v1.CacheService/Stats"] is AUTHENTICATED


def test_roles_come_from_spiffe_uris_and_asyncopd_dns_names_only() -> None:
    ctx = {
        "peer_uri": [b"spiffe://asyncopd/learner", b"spiffe://other/rollout", b"https://asyncopd/teacher"],
        "peer_dns": [b"teacher.asyncopd", b"rollout.example.com", b"asyncopd-cache", b"root.asyncopd"],
        "x509_common_name": [b"rollout"],  # a CN is not a role
    }
    assert roles_of(ctx) == {"learner", "teacher"}
    assert roles_of({}) == frozenset()


def test_refusals_name_the_role_and_the_method() -> None:
    pull = "/asyncopd.v1.CacheService/PullBatch"
    assert refusal(pull, frozenset({"learner"}), True) is None
    why = refusal(pull, frozenset({"rollout"}), True)
    assert why is not None and "rollout" in why and pull in why and "learner" in why
    assert "without a role" in (refusal(pull, frozenset(), True) or "")
    assert "client certificate" in (refusal("/asyncopd.v1.CacheService/Stats", frozenset(), False) or "")
    assert refusal("/asyncopd.v1.CacheService/Stats", frozenset(), True) is None
    assert "not in the authorisation table" in (refusal("/x.Y/Z", frozenset({"learner"}), True) or "")
