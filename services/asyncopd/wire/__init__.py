"""The wire layer: protobuf <-> domain records, the tensor codec, and validation.

Protobuf types stop here: servicers call these functions, domain code sees only
`asyncopd.records` records and numpy/torch arrays.
"""

from asyncopd.wire.convert import (
    Limits,
    prompt_from_proto,
    prompt_to_proto,
    rollout_from_proto,
    rollout_to_proto,
    scored_from_proto,
    scored_to_proto,
    scores_from_proto,
    scores_to_proto,
)
from asyncopd.wire.errors import WireError
from asyncopd.wire.tensors import decode_numpy, decode_torch, encode

__all__ = [
    "Limits",
    "WireError",
    "decode_numpy",
    "decode_torch",
    "encode",
    "prompt_from_proto",
    "prompt_to_proto",
    "rollout_from_proto",
    "rollout_to_proto",
    "scored_from_proto",
    "scored_to_proto",
    "scores_from_proto",
    "scores_to_proto",
]
