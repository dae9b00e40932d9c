"""The domain records that flow through the pipeline: prompts, rollouts, teacher scores, and the
prompt cursor state a checkpoint records.

Plain dataclasses over numpy arrays. They know nothing of protobuf, gRPC or Redis; the
`asyncopd.wire` package converts them to and from the wire protocol and validates them there.

Array conventions (T = response tokens, K = support size or N MC samples, Kt = teacher top-k):
ids are int32, log-probs float32 (they travel as fp16/bf16/fp32), versions int32.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class SupportKind(enum.IntEnum):
    """Per-position support a rollout records besides the sampled token (wire enum values)."""

    NONE = 0
    STUDENT_TOPK = 1
    MC_SAMPLES = 2


@dataclass(frozen=True)
class TaskInfo:
    """What a response needs to be graded."""

    task: str
    answer: str
    prompt_text: str = ""


@dataclass(frozen=True)
class Prompt:
    """A prompt admitted to a rollout replica."""

    prompt_id: str
    prompt_ids: np.ndarray  # int32 [P]
    task: TaskInfo
    epoch: int = 0
    ticket: str = ""
    admitted_version: int = 0


@dataclass(frozen=True)
class Rollout:
    """One generated response with its behaviour log-probs, versions and support."""

    sample_id: str
    prompt_id: str
    ticket: str
    task: TaskInfo
    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [T]
    behavior_logprobs: np.ndarray  # float32 [T]
    versions: np.ndarray  # int32 [T]
    support_kind: SupportKind = SupportKind.NONE
    support_ids: np.ndarray | None = None  # int32 [T, K]
    support_logprobs: np.ndarray | None = None  # float32 [T, K]
    replica: str = ""
    truncated: bool = False
    created_unix: float = 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def oldest_version(self) -> int:
        """The version that bounds staleness: the oldest weights that produced any token."""
        return int(self.versions.min())

    def staleness_at(self, learner_version: int) -> int:
        return learner_version - self.oldest_version


@dataclass(frozen=True)
class TeacherScores:
    """A teacher's per-position scores of one rollout's response tokens."""

    sample_id: str
    token_logprobs: np.ndarray  # float32 [T]
    topk_ids: np.ndarray | None = None  # int32 [T, Kt]
    topk_logprobs: np.ndarray | None = None  # float32 [T, Kt]
    support_logprobs: np.ndarray | None = None  # float32 [T, K]
    tail_logmass: np.ndarray | None = None  # float32 [T]
    teacher: str = ""


@dataclass(frozen=True)
class ScoredSample:
    """A rollout with its teacher scores: what the learner trains on."""

    rollout: Rollout
    scores: TeacherScores


@dataclass(frozen=True)
class CursorState:
    """The prompt cursor as a checkpoint records it (CursorState on the wire): every dataset
    position below `cursor` except `open` was trained (saved in that checkpoint) or counted dropped.
    `runs`: the run id of each cache shard's state it was read from (empty: unknown, an older
    checkpoint); a shard still on that run kept its state and is not restored from it."""

    cursor: int
    open: tuple[int, ...] = ()
    runs: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "open": list(self.open), "runs": list(self.runs)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CursorState:
        return cls(int(raw["cursor"]), tuple(int(p) for p in raw["open"]), tuple(str(r) for r in raw.get("runs", ())))
