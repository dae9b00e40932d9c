"""The config loader: YAML + --set overrides; every error names the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from asyncopd.config import ConfigError, RunConfig, dump_config, load_config
from asyncopd.config.loader import REDIS_PASSWORD_ENV, apply_overrides, parse_override
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

pytestmark = pytest.mark.unit


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.max_staleness >= 0


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("max_staleness: 2\nlearner:\n  lr: 0.001\n  steps: 7\n")
    cfg = load_config(path, ["learner.steps=9", "loss.kind=forward_kl_topk", "rollout.sampling.stop=['#']"])
    assert cfg.max_staleness == 2
    assert cfg.learner.lr == 0.001
    assert cfg.learner.steps == 9
    assert cfg.loss.kind == "forward_kl_topk"
    assert cfg.rollout.sampling.stop == ["#"]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["learner.lrr=1"], ["learner.lrr", "unknown key"]),
        (["bogus=1"], ["bogus", "unknown key"]),
        (["learner.lr=-1"], ["learner.lr", "greater than 0", "got -1"]),
        (["max_staleness=-1"], ["max_staleness", "greater than or equal to 0"]),
        (["loss.kind=kl"], ["loss.kind", "'forward_kl_topk'", "got 'kl'"]),
        (["loss.tail=renorm"], ["tail='renorm' is only defined for kind='forward_kl_topk'"]),
        (["cache.server.port=x"], ["cache.server.port", "valid integer"]),
        (["cache.server.port=70000"], ["cache.server.port", "less than or equal to 65535"]),
        (["redis.url=http://x"], ["redis.url", "should match pattern"]),
        (["tls.enabled=true"], ["tls.enabled=true needs cert_file, key_file, ca_file"]),
        (["learner.steps=1.5"], ["learner.steps", "valid integer"]),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for needle in needles:
        assert needle in str(err.value)


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.lr=0", "learner.steps=0"])
    assert "learner.lr" in str(err.value) and "learner.steps" in str(err.value)


@pytest.mark.parametrize("text", ["=1", "a", "a..b=1", "a=[unclosed"])
def test_malformed_overrides(text: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"learner\.lr is a value, not a section"):
        apply_overrides({"learner": {"lr": 1.0}}, ["learner.lr.x=1"])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(lst)


def test_password_from_env_is_masked_in_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "s3cret-pw")
    cfg = load_config()
    assert cfg.redis.password is not None
    assert cfg.redis.password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in repr(cfg)
    dumped = dump_config(cfg)
    assert "s3cret-pw" not in dumped


def test_dump_round_trips_through_the_loader(tmp_path: Path) -> None:
    cfg = load_config(None, ["learner.steps=3", "max_staleness=0"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["max_staleness"] == 0


def test_shipped_configs_load() -> None:
    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    for path in configs:
        load_config(path)


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of the schema (sections are recursed into)."""
    paths = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _leaf_paths(ann, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


LEAVES = _leaf_paths(RunConfig)


def test_the_schema_has_many_leaves() -> None:
    assert len(LEAVES) > 60 and "cache.server.port" in LEAVES and "loss.kind" in LEAVES


@pytest.mark.parametrize("path", LEAVES)
def test_every_field_rejects_a_mapping_and_names_its_path(path: str) -> None:
    """No leaf accepts a mapping; the error names the exact field path."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{path}={{bogus: 1}}"])
    assert f"  {path}" in str(err.value)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    section=st.sampled_from(sorted({p.split(".")[0] for p in LEAVES if "." in p})),
    key=st.from_regex(r"[a-z][a-z_]{0,20}", fullmatch=True),
)
def test_unknown_keys_anywhere_are_rejected_with_their_path(section: str, key: str) -> None:
    if f"{section}.{key}" in LEAVES or any(p.startswith(f"{section}.{key}.") for p in LEAVES):
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{section}.{key}=1"])
    assert f"{section}.{key}: unknown key" in str(err.value)
