"""Record conversion validates every field and names it in the error."""

from __future__ import annotations

import numpy as np
import pytest
from asyncopd.records import Rollout, ScoredSample, SupportKind, TaskInfo, TeacherScores
from asyncopd.wire import (
    Limits,
    WireError,
    encode,
    rollout_from_proto,
    rollout_to_proto,
    scored_from_proto,
    scored_to_proto,
)

pytestmark = pytest.mark.unit

LIMITS = Limits(vocab_size=32, max_prompt_tokens=16, max_response_tokens=8, max_support=8, max_version=5)


def make_rollout(kind: SupportKind = SupportKind.MC_SAMPLES) -> Rollout:
    resp = np.array([3, 4, 5], dtype=np.int32)
    support = lps = None
    if kind != SupportKind.NONE:
        support = np.stack([resp, resp + 1], axis=1).astype(np.int32)
        lps = np.full((3, 2), -1.5, dtype=np.float32)
    return Rollout(
        sample_id="s0",
        prompt_id="train/0",
        ticket="t0",
        task=TaskInfo("toy", "32", "Q:1+1=? A:"),
        prompt_ids=np.array([1, 2], dtype=np.int32),
        response_ids=resp,
        behavior_logprobs=np.array([-0.1, -0.2, -0.3], dtype=np.float32),
        versions=np.array([2, 2, 3], dtype=np.int32),
        support_kind=kind,
        support_ids=support,
        support_logprobs=lps,
        replica="r0",
    )


@pytest.mark.parametrize("kind", list(SupportKind))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_scored_sample_round_trip(kind: SupportKind, dtype: str) -> None:
    r = make_rollout(kind)
    s = TeacherScores(
        sample_id="s0",
        token_logprobs=np.array([-0.5, -0.25, -2.0], dtype=np.float32),
        topk_ids=np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32),
        topk_logprobs=np.full((3, 2), -0.75, dtype=np.float32),
        support_logprobs=None if r.support_ids is None else np.full((3, 2), -1.0, dtype=np.float32),
    )
    msg = scored_to_proto(ScoredSample(r, s), dtype)  # type: ignore[arg-type]
    back = scored_from_proto(type(msg).FromString(msg.SerializeToString()), LIMITS)
    np.testing.assert_array_equal(back.rollout.response_ids, r.response_ids)
    np.testing.assert_array_equal(back.rollout.versions, r.versions)
    np.testing.assert_allclose(back.rollout.behavior_logprobs, r.behavior_logprobs, rtol=1e-2)
    np.testing.assert_allclose(back.scores.topk_logprobs, s.topk_logprobs, rtol=1e-2)  # type: ignore[arg-type]
    assert back.rollout.support_kind == kind
    assert back.rollout.oldest_version == 2
    assert back.rollout.staleness_at(5) == 3


def _corrupt(field: str, value: object) -> str:
    msg = rollout_to_proto(make_rollout())
    if field == "versions":
        msg.versions.CopyFrom(encode(np.asarray(value, dtype=np.int32)))
    elif field in ("response_ids", "prompt_ids", "support_ids"):
        getattr(msg, field).CopyFrom(encode(np.asarray(value, dtype=np.int32)))
    elif field in ("behavior_logprobs", "support_logprobs"):
        getattr(msg, field).CopyFrom(encode(np.asarray(value, dtype=np.float32)))
    elif field == "sample_id":
        msg.sample_id = str(value)
    elif field == "support_kind":
        msg.support_kind = value  # type: ignore[assignment]
    with pytest.raises(WireError) as err:
        rollout_from_proto(msg, LIMITS)
    return str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("sample_id", "", "rollout.sample_id: must not be empty"),
        ("prompt_ids", [], "rollout.prompt_ids: must hold at least one token"),
        ("prompt_ids", list(range(17)), "exceed the limit of 16"),
        ("response_ids", [3, 4, 40], "token id 40 is outside the vocabulary"),
        ("response_ids", [3, -1, 5], "negative token id"),
        ("behavior_logprobs", [-0.1, float("nan"), -0.3], "NaN log-prob"),
        ("behavior_logprobs", [-0.1, float("-inf"), -0.3], "infinite log-prob"),
        ("behavior_logprobs", [-0.1, 0.5, -0.3], "is not a log-probability"),
        ("behavior_logprobs", [-0.1, -0.2], "shape [2] does not match the expected [3]"),
        ("versions", [2, 2, 9], "from the future"),
        ("versions", [2, -1, 3], "negative version"),
        ("support_ids", [[3, 4], [5, 6], [9, 9]], "MC column 0 must be the generated tokens"),
        ("support_ids", [[3], [4]], "rollout.support_ids: shape"),
        ("support_logprobs", [[-1.0, float("nan")]] * 3, "NaN"),
        ("support_kind", 7, "unknown value 7"),
    ],
)
def test_bad_rollout_fields_name_the_field(field: str, value: object, needle: str) -> None:
    assert needle in _corrupt(field, value)


def test_support_kind_none_with_support_is_rejected() -> None:
    msg = rollout_to_proto(make_rollout())
    msg.support_kind = 0  # type: ignore[assignment]
    with pytest.raises(WireError, match="SUPPORT_NONE"):
        rollout_from_proto(msg, LIMITS)


def test_scores_shape_must_match_rollout() -> None:
    r = make_rollout()
    s = TeacherScores(
        sample_id="s0",
        token_logprobs=np.array([-0.5, -0.25], dtype=np.float32),
        support_logprobs=np.full((2, 2), -1.0, dtype=np.float32),
    )
    with pytest.raises(WireError, match=r"sample\.scores\.token_logprobs: shape"):
        scored_from_proto(scored_to_proto(ScoredSample(r, s)), LIMITS)
