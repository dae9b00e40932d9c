"""The chart's weight-sync store key: a Secret with a random key (on by default), read by the
learner (signs) and the rollouts (verify) only, under the env var the services read; an
existing Secret is used instead; weightsyncAuth.enabled=false renders neither."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from asyncopd.config.weightsync import WEIGHTSYNC_KEY_ENV
from test_chart import ALL_SETS, find, render, workloads

SIGNERS = {"learner", "rollout"}


def key_refs(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """component -> the secretKeyRef of its weight-sync key env var."""
    out = {}
    for w in workloads(docs):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in w["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if e["name"] == WEIGHTSYNC_KEY_ENV:
                    out[component] = e["valueFrom"]["secretKeyRef"]
    return out


@pytest.mark.parametrize("values", ALL_SETS)
def test_learner_and_rollouts_get_a_generated_key_by_default(values: str) -> None:
    docs = render(values)
    secret = find(docs, "Secret", "rel-asyncopd-weightsync")
    key = base64.b64decode(secret["data"]["weightsync-key"]).decode()
    assert len(key) == 48 and key.isalnum()
    refs = key_refs(docs)
    assert set(refs) == SIGNERS, values or "defaults"
    assert all(ref == {"name": "rel-asyncopd-weightsync", "key": "weightsync-key"} for ref in refs.values())


def test_an_existing_secret_is_used_and_none_is_created() -> None:
    docs = render("", "--set", "weightsyncAuth.existingSecret=my-ws", "--set", "weightsyncAuth.existingSecretKey=k")
    assert not [d for d in docs if d["metadata"]["name"] == "rel-asyncopd-weightsync"]
    refs = key_refs(docs)
    assert set(refs) == SIGNERS
    assert all(ref == {"name": "my-ws", "key": "k"} for ref in refs.values())


def test_disabled_renders_no_key() -> None:
    docs = render("", "--set", "weightsyncAuth.enabled=false")
    assert not [d for d in docs if d["metadata"]["name"] == "rel-asyncopd-weightsync"]
    assert key_refs(docs) == {}
