"""The weight-sync store's authenticated values: a payload, a key or a key name other than the
signer's is refused; an unsigned signer (no key configured) reads any envelope."""

from __future__ import annotations

import json

import pytest
from asyncopd.weightsync import groups
from asyncopd.weightsync.groups import Signer, StoreAuthError

NAME = groups.command_key(3, 7)
PAYLOAD = json.dumps({"op": "update", "version": 5, "manifest": "{}"})


def test_a_signed_value_verifies_under_its_own_key_name() -> None:
    signer = Signer("s3cret")
    assert signer.decode(NAME, signer.encode(NAME, PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize(
    "forge",
    [
        # tampered payload, the MAC kept
        lambda raw: json.dumps({**json.loads(raw), "v": PAYLOAD.replace("5", "6")}),
        # written by a client with another key
        lambda _: Signer("wrong").encode(NAME, PAYLOAD),
        # written by a client without a key (an empty MAC)
        lambda _: Signer(None).encode(NAME, PAYLOAD),
        # the raw JSON a client that knows the protocol but not the key would write
        lambda _: PAYLOAD,
        # a value signed for another key name (another epoch/seq), replayed here
        lambda _: Signer("s3cret").encode(groups.command_key(3, 6), PAYLOAD),
        lambda _: Signer("s3cret").encode(groups.command_key(2, 7), PAYLOAD),
        lambda _: "not json",
        lambda _: json.dumps({"v": {"op": "update"}, "mac": ""}),
    ],
)
def test_a_forged_value_is_refused(forge) -> None:  # type: ignore[no-untyped-def]
    signer = Signer("s3cret")
    with pytest.raises(StoreAuthError):
        signer.decode(NAME, forge(signer.encode(NAME, PAYLOAD)))


class FakeStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)


def test_a_refused_value_reads_as_absent_and_is_counted() -> None:
    store = FakeStore()
    signer = Signer("s3cret")
    Signer("wrong").put_json(store, NAME, {"op": "rebuild"})  # type: ignore[arg-type]
    assert signer.read(store, NAME) is None  # type: ignore[arg-type]
    assert signer.poll_json(store, NAME, timeout_s=0.05, interval_s=0.01) is None  # type: ignore[arg-type]
    assert not signer.present(store, NAME)  # type: ignore[arg-type]
    assert signer.refused >= 3
    signer.put_json(store, NAME, {"op": "rebuild"})  # type: ignore[arg-type]  # the real writer replaces it
    assert signer.poll_json(store, NAME, timeout_s=0.05) == {"op": "rebuild"}  # type: ignore[arg-type]


def test_an_unsigned_signer_reads_any_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(groups.KEY_ENV, raising=False)
    unsigned = Signer.from_env()
    assert unsigned.secret is None
    assert unsigned.decode(NAME, Signer("any").encode(NAME, "build")) == "build"
    monkeypatch.setenv(groups.KEY_ENV, "from-env")
    assert Signer.from_env().decode(NAME, Signer("from-env").encode(NAME, "build")) == "build"


def test_the_local_launcher_gives_every_child_of_a_run_one_random_key() -> None:
    from asyncopd.config import RunConfig
    from asyncopd.lab.launch.child_config import child_env

    config = RunConfig()
    first, second = child_env(config, base={}), child_env(config, base={})
    assert len(first[groups.KEY_ENV]) >= 32
    assert first[groups.KEY_ENV] != second[groups.KEY_ENV], "one key per run, not a constant"
    assert child_env(config, base={groups.KEY_ENV: "given"})[groups.KEY_ENV] == "given"
