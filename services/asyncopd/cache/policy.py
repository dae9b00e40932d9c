"""The cache's staleness policy: which samples are usable, which versions are believable, how many
samples may be in flight. The one home of these rules (style: "a policy has one home").

Pure: plain integers in, integers and booleans out; refusals are `ValueError`s whose message
says what to do (servicers map them to INVALID_ARGUMENT). It knows nothing of Redis, Lua or
gRPC. Its callers:

- the store computes every number its Lua scripts compare against here and passes it in as an
  argument (the admission window, the oldest usable version), so the scripts apply the rules
  atomically without re-deriving them;
- the servicer refuses impossible requests with it (versions from the future, a sample id twice
  in one request, a batch larger than the window);
- the cache reports `window` in its Stats RPC, and the autoscaler reads it there;
- the fleet benchmark bounds throughput with `window` (Little's law).

The rules, for the learner's version v (its optimizer steps) and max_staleness = eta:

- **stale**: a sample whose oldest token version ov is below v - eta (staleness v - ov > eta)
  is never trained on; one exactly eta versions behind is still usable.
- **future**: a token version above published + 1 is refused. The learner broadcasts weights
  v + 1 to the replicas before it publishes v + 1 to the cache, so a fast replica may already
  answer with tokens one version ahead; anything further ahead is a bug or a lie.
- **window**: per learner version, open admission slots (admitted, neither trained nor
  dropped) plus samples already pulled at v never exceed (eta + 1) * batch_size (AReaL-style
  capacity). eta = 0 is strict synchronous training: one batch per version.
- **duplicates**: a request naming one sample twice is refused whole (a client bug); a sample
  re-sent in a later request is counted as a duplicate and not stored again (that is the store's
  job: it needs Redis's state).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StalenessPolicy:
    """The staleness bound `max_staleness` (eta) and the learner's `batch_size` (B)."""

    max_staleness: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def window(self) -> int:
        """(eta + 1) * B: samples admitted per learner version, and the most ever in flight."""
        return (self.max_staleness + 1) * self.batch_size

    def oldest_usable(self, version: int) -> int:
        """The oldest token version a sample may carry to be trained at learner `version`."""
        return version - self.max_staleness

    def is_stale(self, oldest_version: int, version: int) -> bool:
        """True when a sample whose oldest token is `oldest_version` is beyond the bound at `version`."""
        return oldest_version < self.oldest_usable(version)

    def within_bound(self, staleness: int) -> bool:
        """The same rule in staleness terms (version - oldest token version): at most eta."""
        return staleness <= self.max_staleness

    def newest_allowed(self, published: int) -> int:
        """The newest token version a rollout may carry while the cache has `published`."""
        return published + 1

    def check_token_version(self, newest: int, published: int, field: str) -> None:
        """Refuse a rollout whose newest token version is from the future."""
        allowed = self.newest_allowed(published)
        if newest > allowed:
            raise ValueError(
                f"{field}: version {newest} is from the future (the learner published {published}; "
                f"tokens may carry at most {allowed})"
            )

    def check_pull_size(self, size: int) -> None:
        """Refuse a batch size the cache can never serve (below 1, or above the window)."""
        if size < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        if size > self.window:
            raise ValueError(
                f"size: {size} can never be served; admission keeps at most "
                f"(max_staleness + 1) * learner.batch_size = {self.window} samples in flight"
            )


def check_unique(sample_ids: Iterable[str], field: str) -> None:
    """Refuse a request that names one sample twice (re-sent work belongs in a later request)."""
    seen: set[str] = set()
    for i, sid in enumerate(sample_ids):
        if sid in seen:
            raise ValueError(f"{field}[{i}].sample_id: {sid!r} appears twice in this request")
        seen.add(sid)
