"""An in-memory `BatchSource` (asyncopd.learner.loop) for learner tests that need no cache.

`StubBatchSource` begins a learner at the published version, has no run state and a cursor at
0, numbers the batches it hands out (`batch(n, size)` says what batch n holds), acks every batch
and records the versions published. Tests override what they script: refused acks, failures,
the staleness of what they serve. Importable from tests/unit and tests/service alike (pytest puts
this folder on sys.path for its conftest).
"""

from __future__ import annotations

from collections.abc import Sequence

from asyncopd.records import CursorState
from asyncopd.wire.cache_client import Batch, LearnerStart


class StubBatchSource:
    def __init__(self, published: int = 0) -> None:
        self.published = published
        self.versions: list[int] = []
        self.acked: list[str] = []
        self.n = 0

    def batch(self, n: int, size: int) -> Batch:
        """Batch number `n` (1, 2, ...) for a pull of `size` samples."""
        raise NotImplementedError

    def begin_learner(
        self, learner: str = "learner", checkpoint_version: int | None = None, cursor: CursorState | None = None
    ) -> LearnerStart:
        return LearnerStart(1, self.published, self.published, 0)

    def run_state(self) -> tuple[tuple[str, ...], bool]:
        return (), False

    def prompt_cursor(
        self, trained_batch_ids: Sequence[str], saved: CursorState | None = None, trained_tickets: Sequence[str] = ()
    ) -> CursorState:
        return CursorState(0)

    def pull_batch(
        self, size: int, learner_version: int, wait_ms: int = 0, learner: str = "learner", keep: Sequence[str] = ()
    ) -> Batch:
        self.n += 1
        return self.batch(self.n, size)

    def ack_batch(self, batch_id: str) -> int:
        self.acked.append(batch_id)
        return 1

    def publish_version(self, version: int, finished: bool = False) -> int:
        self.published = version
        self.versions.append(version)
        return version
