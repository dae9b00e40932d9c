"""RolloutService.PushWeights on a real gRPC server (loopback, transformers engine, the shipped
toy student): the pushes issue 20 reproduced — a version of 1e9, NaN values, a tensor whose
slices cover half its elements — and their relatives are INVALID_ARGUMENT with a message naming
what is wrong, and leave the replica's version and weights exactly as they were. A well-formed
update (whole or sliced) is applied; a re-send of the held version is acknowledged, not applied;
a replica that fell behind takes the learner's current version when the servicer knows the
cache's published version, and nothing further ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from asyncopd.config.endpoints import ServerConfig
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.rollout.replica import RolloutReplica
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.servicer import SERVICE_NAME, RolloutServicer
from asyncopd.rollout.transformers_engine import TransformersEngine
from asyncopd.v1 import rollout_pb2, rollout_pb2_grpc
from asyncopd.weightsync.grpc_transport import chunks
from asyncopd.wire import encode
from asyncopd.wire.rpc import channel, start_server

pytestmark = pytest.mark.service

STUDENT = "assets/toy-student"


@dataclass
class Served:
    model: torch.nn.Module
    replica: RolloutReplica
    stub: rollout_pb2_grpc.RolloutServiceStub
    published: list[int]  # what the servicer's `published()` answers (the cache's learner version)

    @property
    def version(self) -> int:
        return self.replica.engine.version

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def push(self, stream: list[rollout_pb2.WeightChunk]) -> rollout_pb2.PushWeightsResponse:
        return self.stub.PushWeights(iter(stream), timeout=60)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    model = load_model(STUDENT)
    replica = RolloutReplica(TransformersEngine(model, load_tokenizer(STUDENT), "rollout-push"), "rollout-push")
    published = [-1]
    servicer = RolloutServicer(replica, Sampling(max_tokens=4), published=lambda: published[0])
    server = start_server(
        ServerConfig(port=0),
        [lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
    )
    ch = channel(server.address)
    try:
        yield Served(model, replica, rollout_pb2_grpc.RolloutServiceStub(ch), published)
    finally:
        ch.close()
        server.stop(grace=0.5)


def update(served: Served, scale: float) -> list[tuple[str, torch.Tensor]]:
    """A complete, well-formed update: every parameter of the model, changed by `scale`."""
    return [(n, t * scale + 0.01) for n, t in served.state().items()]


def largest(served: Served) -> tuple[str, torch.Tensor]:
    return max(served.state().items(), key=lambda kv: kv[1].numel())


def refused_unchanged(served: Served, stream: list[rollout_pb2.WeightChunk], *needles: str) -> str:
    """The push is INVALID_ARGUMENT naming every needle, and the replica holds what it held."""
    version, state = served.version, served.state()
    with pytest.raises(grpc.RpcError) as info:
        served.push(stream)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for needle in needles:
        assert needle in (err.details() or ""), (needle, err.details())
    assert served.version == version
    for name, tensor in served.state().items():
        assert torch.equal(tensor, state[name]), f"{name} changed by a refused push"
    return err.details() or ""


def test_a_version_of_1e9_is_refused(served: Served) -> None:
    stream = list(chunks(10**9, update(served, 2.0)))
    refused_unchanged(served, stream, "version", str(10**9), f"({served.version + 1}")


def test_nan_or_inf_values_are_refused(served: Served) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        named = update(served, 2.0)
        name, tensor = named[3]
        tensor.view(-1)[tensor.numel() // 2] = bad
        refused_unchanged(served, list(chunks(served.version + 1, named)), "NaN/Inf", name)


def test_nan_inside_one_slice_of_a_sliced_tensor_is_refused(served: Served) -> None:
    named = update(served, 2.0)
    name, tensor = largest(served)
    poisoned = dict(named)
    poisoned[name].view(-1)[-1] = float("nan")
    stream = list(chunks(served.version + 1, list(poisoned.items()), chunk_mb=tensor.nbytes / 4 / (1 << 20)))
    assert sum(c.name == name for c in stream) > 1, "the tensor must travel in slices"
    refused_unchanged(served, stream, "NaN/Inf", name)


def sliced(served: Served, version: int, keep: Callable[[int, int], bool]) -> tuple[str, list]:  # type: ignore[type-arg]
    """A full update whose largest tensor travels in 4 slices; `keep(index, offset)` picks the slices sent."""
    name, tensor = largest(served)
    stream = list(chunks(version, update(served, 2.0), chunk_mb=tensor.nbytes / 4 / (1 << 20)))
    pieces = [c for c in stream if c.name == name]
    assert len(pieces) == 4, len(pieces)
    kept = [c for c in stream if c.name != name or keep(pieces.index(c), c.offset)]
    kept[-1].last = True
    return name, kept


def test_a_tensor_covering_half_its_slots_is_refused(served: Served) -> None:
    name, stream = sliced(served, served.version + 1, lambda index, _: index < 2)
    refused_unchanged(served, stream, name, "uninitialised")


def test_a_gap_inside_a_sliced_tensor_is_refused(served: Served) -> None:
    name, stream = sliced(served, served.version + 1, lambda index, _: index != 1)
    refused_unchanged(served, stream, name, "never written")


def test_an_element_written_twice_is_refused(served: Served) -> None:
    name, stream = sliced(served, served.version + 1, lambda index, _: True)
    first = next(c for c in stream if c.name == name)
    twice = rollout_pb2.WeightChunk()
    twice.CopyFrom(first)
    stream.insert(stream.index(first) + 1, twice)  # the same slice again: more than its elements
    refused_unchanged(served, stream, name, "more than")
    # Same count, wrong place: slice 2 sent twice instead of slice 3.
    name, stream = sliced(served, served.version + 1, lambda index, _: index != 3)
    third = [c for c in stream if c.name == name][2]
    again = rollout_pb2.WeightChunk()
    again.CopyFrom(third)
    again.last = False
    stream.insert(stream.index(third) + 1, again)
    refused_unchanged(served, stream, name, "written twice")


def test_names_shapes_and_dtypes_are_the_engines(served: Served) -> None:
    version = served.version + 1
    good = update(served, 2.0)
    name, tensor = good[0]

    def one(replace: tuple[str, torch.Tensor]) -> list[rollout_pb2.WeightChunk]:
        return list(chunks(version, [replace if n == name else (n, t) for n, t in good]))

    refused_unchanged(served, list(chunks(version, [*good, ("no.such.weight", torch.zeros(2))])), "unknown parameter")
    refused_unchanged(served, one((name, tensor.reshape(-1))), "shape", name)
    refused_unchanged(served, one((name, tensor.to(torch.int32))), "dtype", name)
    refused_unchanged(served, one((name, tensor > 0)), "dtype", name)
    # A slice that announces more elements than the parameter has is refused before anything is allocated.
    bad = [rollout_pb2.WeightChunk(version=version, name=name, tensor=encode(tensor[:1]), numel=2**50, last=True)]
    refused_unchanged(served, bad, "numel", str(2**50))


def test_versions_older_than_held_are_refused_and_the_held_one_is_not_reapplied(served: Served) -> None:
    named = update(served, 3.0)
    assert served.push(list(chunks(served.version + 1, named))).tensors == len(named)
    held, state = served.version, served.state()
    refused_unchanged(served, list(chunks(held - 1, update(served, 5.0))), "version", "older")
    # The learner re-sending the version the replica holds (after picking it up again): acknowledged, not applied.
    reply = served.push(list(chunks(held, update(served, 7.0))))
    assert (reply.version, reply.tensors) == (held, 0)
    assert served.version == held
    assert all(torch.equal(t, state[n]) for n, t in served.state().items())


def test_a_good_update_is_applied_whole_or_sliced(served: Served) -> None:
    named = update(served, 0.5)
    name, tensor = largest(served)
    stream = list(chunks(served.version + 1, named, chunk_mb=tensor.nbytes / 3 / (1 << 20), checksum=True))
    assert sum(c.name == name for c in stream) > 1
    reply = served.push(stream)
    assert (reply.version, reply.tensors) == (served.version, len(named))
    got = served.state()
    for n, t in named:
        assert torch.equal(got[n], t), n


def test_a_replica_behind_the_published_version_takes_the_current_one_and_no_further(served: Served) -> None:
    held = served.version
    try:
        served.published[0] = held + 4  # the learner moved on while this replica was cut off
        refused_unchanged(served, list(chunks(held + 6, update(served, 2.0))), "version", f"({held + 5}")
        reply = served.push(list(chunks(held + 5, update(served, 2.0))))
        assert (reply.version, served.version) == (held + 5, held + 5)
    finally:
        served.published[0] = -1
