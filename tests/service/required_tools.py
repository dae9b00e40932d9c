"""A test that needs a system tool (openssl, prometheus, redis-server) never passes without it.

`make test` installs every such tool (deploy/dev/sysdeps.sh) and `.ci/run` sets CI=1, so under
CI a missing tool fails the test. Elsewhere (a developer's machine without the tool) it skips,
with the reason pytest's `-ra` summary lists at the end of the run.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def require_tool(name: str) -> str:
    """The path of executable `name`; when missing, fail under CI and skip (with a reason) otherwise."""
    path = shutil.which(name)
    if path is not None:
        return path
    missing_tool(name)


def missing_tool(name: str) -> NoReturn:
    """Tool `name` was not found: fail under CI, skip (with the reason) otherwise."""
    why = f"{name} is not on PATH (deploy/dev/sysdeps.sh installs it; `make test` runs that)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; under CI a missing tool is a failure, not a skip")
    pytest.skip(why)
