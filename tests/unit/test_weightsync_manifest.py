"""What a receiver checks in an announced manifest before it allocates anything: tensors inside
their buckets without sharing bytes, buckets no larger than their tensors packed, and — against
the receiving model — only its own names, shapes and dtypes. Together: an announcement never
asks for more than the model's size."""

from __future__ import annotations

import json

import pytest
import torch
from asyncopd.weightsync.manifest import Manifest, ManifestError, ParamSpec, param_specs, plan

PETABYTE = 1 << 50


def named() -> list[tuple[str, torch.Tensor]]:
    return [
        ("embed", torch.zeros(300, 40)),
        ("norm", torch.zeros(40, dtype=torch.bfloat16)),
        ("empty", torch.zeros(0)),
        ("steps", torch.zeros(1, dtype=torch.int64)),
    ]


def announced(tensors: list[list[object]], sizes: list[int]) -> str:
    return json.dumps({"tensors": tensors, "bucket_sizes": sizes})


@pytest.mark.parametrize("bucket_bytes", [16, 4096, 1 << 20])
def test_planned_manifests_pass_and_take_exactly_their_tensors_bytes(bucket_bytes: int) -> None:
    manifest = plan(named(), bucket_bytes)
    assert Manifest.from_json(manifest.to_json()) == manifest
    manifest.check_fits({n: ParamSpec.of(t) for n, t in named()})
    assert manifest.total_bytes == sum((t.numel() * t.element_size() + 15) // 16 * 16 for _, t in named())


def test_a_bucket_larger_than_its_tensors_is_refused() -> None:
    with pytest.raises(ManifestError, match="bucket 0 announces"):
        Manifest.from_json(announced([["embed", "float32", [300, 40], 0, 0]], [PETABYTE]))
    with pytest.raises(ManifestError, match="bucket 1 announces"):
        Manifest.from_json(announced([["embed", "float32", [300, 40], 0, 0]], [48000, 16]))


def test_overlapping_tensors_are_refused() -> None:
    text = announced([["a", "float32", [8], 0, 0], ["b", "float32", [8], 0, 16]], [64])
    with pytest.raises(ManifestError, match="overlap"):
        Manifest.from_json(text)
    # Adjacent ones, and an empty tensor at the same offset as another, do not overlap.
    Manifest.from_json(
        announced([["a", "float32", [4], 0, 0], ["e", "float32", [0], 0, 16], ["b", "float32", [4], 0, 16]], [32])
    )


def test_only_the_models_own_tensors_fit() -> None:
    model = {n: ParamSpec.of(t) for n, t in named()}
    huge = Manifest.from_json(announced([["evil", "float32", [PETABYTE // 4], 0, 0]], [PETABYTE]))
    with pytest.raises(ManifestError, match="does not have"):
        huge.check_fits(model)
    reshaped = Manifest.from_json(announced([["norm", "bfloat16", [PETABYTE // 2], 0, 0]], [PETABYTE]))
    with pytest.raises(ManifestError, match="shape"):
        reshaped.check_fits(model)
    retyped = Manifest.from_json(announced([["norm", "float32", [40], 0, 0]], [160]))
    with pytest.raises(ManifestError, match="bfloat16"):
        retyped.check_fits(model)
    # A subset of the model is a valid update.
    Manifest.from_json(announced([["norm", "bfloat16", [40], 0, 0]], [80])).check_fits(model)


def test_shape_only_specs_take_any_floating_dtype() -> None:
    model = param_specs({"w": (4, 3)})
    for dtype, size in (("float32", 48), ("bfloat16", 32), ("float16", 32)):
        Manifest.from_json(announced([["w", dtype, [4, 3], 0, 0]], [size])).check_fits(model)
    with pytest.raises(ManifestError, match="floating-point"):
        Manifest.from_json(announced([["w", "int64", [4, 3], 0, 0]], [96])).check_fits(model)
