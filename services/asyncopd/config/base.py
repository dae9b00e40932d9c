"""The base class every config section derives from: strict, typed, documented.

Strict means an unknown key is an error (a typo never silently falls back to a default) and
values are not coerced across types (a string is not silently a number).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are rejected, defaults are validated, fields frozen."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)
