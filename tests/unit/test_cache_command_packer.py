"""The cache's Redis client packs commands with one hiredis call (`CommandPacker`): the same
bytes on the wire as redis-py's own packer for every argument type the cache sends, redis-py's
errors for the ones it refuses. (That `connect` gives every connection this packer is tested
against a real Redis in tests/service/test_redis_safety.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from asyncopd.cache.connection import CommandPacker
from redis.connection import PythonRespSerializer

pytestmark = pytest.mark.unit


def _wire(packed: list[Any]) -> bytes:
    return b"".join(bytes(part) for part in packed)


def _redis_py(*args: Any) -> bytes:
    """What redis-py's pure-Python packer sends (the reference encoding)."""
    return _wire(PythonRespSerializer(6000, redis.connection.Encoder("utf-8", "strict", False).encode).pack(*args))


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "0" * 40, 1, "asyncopd:{asyncopd:s0}:", 1733450000123, "r0", 4, -3, 0),
        ("HMGET", "asyncopd:s:t-1/s", "T", "K", "st"),
        ("EVALSHA", "f" * 40, 1, "p:", "tëcher-ü", 0.25, 1e-05, 2.0, 123456789012345678901234567890),
        ("SET", b"asyncopd:pr:x", b"\x00\xff" * 5000, "PX", 60000),
        ("SET", "k", memoryview(b"frame bytes")),
        ("SCRIPT LOAD", "return 1"),
        (b"CONFIG GET", b"maxmemory-policy"),
        ("SET", "k", bytearray(b"inline frame")),
    ],
)
def test_the_packer_sends_what_redis_py_sends(args: tuple[Any, ...]) -> None:
    assert _wire(CommandPacker().pack(*args)) == _redis_py(*args)


def test_the_packer_is_one_hiredis_call_for_plain_arguments() -> None:
    packed = CommandPacker().pack("EVALSHA", "0" * 40, 1, "k", *range(300))
    assert len(packed) == 1 and isinstance(packed[0], bytes)


@pytest.mark.parametrize("bad", [True, None, object()])
def test_arguments_redis_py_refuses_are_refused_the_same_way(bad: Any) -> None:
    with pytest.raises(redis.DataError):
        CommandPacker().pack("SET", "k", bad)
