"""Delta encoding of a weight bucket: only the 16-bit words that changed since the previous version.

A bucket is a flat uint8 tensor (`asyncopd.weightsync.manifest`) whose size and tensor offsets
are multiples of 16 bytes, so it is also a sequence of 16-bit words: one word per bf16/fp16
element, two per fp32 element. `encode(previous, new)` compares the two versions of one bucket
word by word and picks the smallest of three forms, counted exactly in bytes:

| encoding  | payload                                              | bytes               |
|-----------|------------------------------------------------------|---------------------|
| `dense`   | the new bucket as is                                 | 2n                  |
| `sparse`  | int32 indices of the k changed words, then their int16 values | 6k          |
| `bitmask` | one bit per word (little-endian bit order, padded to 2 bytes), then the k values | 2 ceil(n/16) + 2k |

for a bucket of n words of which k changed. Ties go to `dense` (nothing to decode), so a delta is
used only when it is strictly smaller: sparse below k < n/32 changed words, the bitmask up to
k < 15n/16. `decode_into(base, delta)` writes the new bucket over the previous one in place.

Words are compared as bits, not as numbers: -0.0 vs 0.0 or a NaN payload change is a change, so
the decoded bucket equals the new one byte for byte, whatever dtype its tensors hold.

It knows flat tensors and bytes; it knows nothing of manifests, versions, groups or engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Encoding = Literal["dense", "sparse", "bitmask"]
ENCODINGS: tuple[Encoding, ...] = ("dense", "sparse", "bitmask")

_WORD = 2  # bytes per compared word (one bf16 element)
_INDEX = 4  # bytes per sparse index (int32: a bucket holds < 2**31 words)
_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


class DeltaError(ValueError):
    """A delta that cannot be decoded onto the bucket given (wrong size, counts or indices)."""


def payload_bytes(encoding: Encoding, words: int, changed: int) -> int:
    """Exact byte size of a bucket of `words` 16-bit words with `changed` of them changed, in `encoding`."""
    if encoding == "dense":
        return _WORD * words
    if encoding == "sparse":
        return (_INDEX + _WORD) * changed
    if encoding == "bitmask":
        return _mask_bytes(words) + _WORD * changed
    raise DeltaError(f"unknown delta encoding {encoding!r}; one of {ENCODINGS}")


def choose(words: int, changed: int) -> Encoding:
    """The smallest encoding of such a bucket (`dense` on ties: a delta must be strictly smaller)."""
    return min(ENCODINGS, key=lambda e: (payload_bytes(e, words, changed), ENCODINGS.index(e)))


@dataclass(frozen=True)
class BucketDelta:
    """One bucket's update as sent: its encoding, how many words changed, and the payload bytes."""

    encoding: Encoding
    changed: int
    payload: Tensor  # flat uint8; for `dense` the new bucket itself (not a copy)

    @property
    def nbytes(self) -> int:
        return int(self.payload.numel())


def _words(bucket: Tensor) -> Tensor:
    if bucket.dtype != torch.uint8 or bucket.dim() != 1 or bucket.numel() % _WORD:
        raise DeltaError(f"a bucket is a flat uint8 tensor of an even size, got {bucket.dtype} {tuple(bucket.shape)}")
    return bucket.view(torch.int16)


def _mask_bytes(words: int) -> int:
    return _WORD * ((words + 15) // 16)  # one bit per word, padded so the values stay 2-byte aligned


def pack_bits(mask: Tensor) -> Tensor:
    """Bool mask -> uint8 bytes, bit i of byte j = mask[8j + i], padded to `_mask_bytes`."""
    if mask.device.type != "cpu":
        return pack_bits_torch(mask)
    packed = np.zeros(_mask_bytes(mask.numel()), dtype=np.uint8)  # numpy's packbits: ~100x the torch passes
    bits = np.packbits(mask.numpy(), bitorder="little")
    packed[: bits.size] = bits
    return torch.from_numpy(packed)


def pack_bits_torch(mask: Tensor) -> Tensor:
    """`pack_bits` on any device (eight strided passes; a uint8 sum over dim 1 is far slower)."""
    padded = torch.zeros(_mask_bytes(mask.numel()) * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask
    bits = padded.view(-1, 8)
    packed = bits[:, 0].clone()
    for i in range(1, 8):
        packed.bitwise_or_(bits[:, i].bitwise_left_shift(i))
    return packed


def unpack_bits(packed: Tensor, words: int) -> Tensor:
    if packed.device.type != "cpu":
        return unpack_bits_torch(packed, words)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=words, bitorder="little").view(np.bool_))


def unpack_bits_torch(packed: Tensor, words: int) -> Tensor:
    """`unpack_bits` on any device: the first `words` bits as a bool tensor."""
    bits = packed.unsqueeze(1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:words]


@torch.no_grad()
def encode(previous: Tensor, new: Tensor) -> BucketDelta:
    """The smallest form of `new` given `previous` (two versions of the same bucket)."""
    if previous.shape != new.shape or previous.device != new.device:
        raise DeltaError(f"buckets differ in shape or device: {tuple(previous.shape)} vs {tuple(new.shape)}")
    old_words, new_words = _words(previous), _words(new)
    mask = old_words.ne(new_words)
    index = mask.nonzero().reshape(-1)  # the changed words, in order (a bool sum is ~3x slower on CPU)
    words, changed = int(mask.numel()), int(index.numel())
    encoding = choose(words, changed)
    if encoding == "dense":
        return BucketDelta("dense", changed, new)
    values = new_words[index].view(torch.uint8)
    if encoding == "sparse":
        payload = torch.cat([index.to(torch.int32).view(torch.uint8), values])
    else:
        payload = torch.cat([pack_bits(mask), values])
    return BucketDelta(encoding, changed, payload)


@torch.no_grad()
def decode_into(base: Tensor, encoding: Encoding, changed: int, payload: Tensor) -> Tensor:
    """Write the new bucket over `base` (the previous version, updated in place) and return it."""
    base_words = _words(base)
    words = int(base_words.numel())
    if not 0 <= changed <= words:
        raise DeltaError(f"{changed} changed words announced for a bucket of {words}")
    expected = payload_bytes(encoding, words, changed)
    if payload.dtype != torch.uint8 or payload.numel() != expected:
        raise DeltaError(f"{encoding} payload of {payload.numel()} bytes, {expected} expected ({changed}/{words})")
    if encoding == "dense":
        base.copy_(payload)
        return base
    if encoding == "sparse":
        index = payload[: _INDEX * changed].view(torch.int32).long()
        if changed and (int(index.min()) < 0 or int(index.max()) >= words):
            raise DeltaError(f"sparse delta indexes outside the bucket's {words} words")
        base_words[index] = payload[_INDEX * changed :].view(torch.int16)
        return base
    mask = unpack_bits(payload[: _mask_bytes(words)], words)
    index = mask.nonzero().reshape(-1)  # assigning through an index is ~5x faster than through a bool mask
    if int(index.numel()) != changed:
        raise DeltaError(f"bitmask marks {int(index.numel())} words, {changed} announced")
    base_words[index] = payload[_mask_bytes(words) :].view(torch.int16)
    return base
