"""The chart's FSDP learner: config.learner.world_size > 1 renders one StatefulSet pod per rank."""

from __future__ import annotations

import subprocess

import pytest
from test_chart import find, render


def test_world_size_two_runs_two_rank_pods_that_meet_at_learner_0() -> None:
    docs = render("learner-fsdp-values.yaml")
    learner = find(docs, "StatefulSet", "rel-asyncopd-learner")
    spec = learner["spec"]
    assert spec["replicas"] == 2
    assert spec["podManagementPolicy"] == "Parallel"  # rank 0 is not ready until rank 1 joins
    assert spec["serviceName"] == "rel-asyncopd-learner"
    assert find(docs, "Service", "rel-asyncopd-learner")["spec"]["clusterIP"] == "None"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["WORLD_SIZE"]["value"] == "2"
    assert env["MASTER_ADDR"]["value"] == "rel-asyncopd-learner-0.rel-asyncopd-learner.ns.svc"
    assert env["MASTER_PORT"]["value"] == "29501"
    assert {"name": "rendezvous", "containerPort": 29501, "protocol": "TCP"} in container["ports"]
    # every rank writes its checkpoint shards into one shared directory
    assert "volumeClaimTemplates" not in spec
    data = next(v for v in spec["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "asyncopd-checkpoints"
    policy = find(docs, "NetworkPolicy", "rel-asyncopd-learner")
    rules = policy["spec"]["ingress"]
    sources = [f["podSelector"]["matchLabels"] for rule in rules for f in rule.get("from", []) if "podSelector" in f]
    assert any(s.get("app.kubernetes.io/component") == "learner" for s in sources)


def test_one_rank_keeps_the_single_pod_learner() -> None:
    spec = find(render(), "StatefulSet", "rel-asyncopd-learner")["spec"]
    assert (spec["replicas"], spec["podManagementPolicy"]) == (1, "OrderedReady")
    names = {e["name"] for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert not names & {"RANK", "WORLD_SIZE", "MASTER_ADDR"}


def test_ranks_without_a_shared_checkpoint_volume_are_refused() -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        render("", "--set", "config.learner.world_size=2")
    assert "learner.persistence.sharedClaim" in err.value.stderr
