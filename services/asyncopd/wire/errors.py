"""The one error type of the wire layer: a message that cannot be accepted, and why."""

from __future__ import annotations


class WireError(ValueError):
    """Malformed or out-of-range wire data. Servicers map it to INVALID_ARGUMENT.

    The message starts with the field path (e.g. ``rollouts[2].versions``) and says what is
    wrong and what was expected.
    """
