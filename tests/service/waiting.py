"""Waiting on a condition, not on the clock: a test polls for what it expects with a deadline
generous enough for a loaded 2-core machine, instead of sleeping or bounding elapsed time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def returns_within(seconds: float, fn: Callable[[], Any], what: str) -> Any:
    """Run `fn` in a thread and return its result; fail if it has not returned after `seconds`
    (a hang), re-raising what it raised. The deadline is a hang detector, not a speed check:
    choose it well above the bounded time the claim promises."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True, name=f"returns-within: {what}")
    thread.start()
    deadline = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(timeout=0.05)
    assert not thread.is_alive(), f"{what}: still running after {seconds:.0f} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")
