"""Loading a RunConfig from YAML plus `--set a.b=c` overrides, with errors that name the field.

This is the one place that reads the environment for config (the Redis password), so a
secret never has to be written into a file that gets logged or rendered.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from asyncopd.config.run import RunConfig

REDIS_PASSWORD_ENV = "ASYNCOPD_REDIS_PASSWORD"


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field and what is allowed."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `asyncopd config schema` lists every field)"
        got = item.get("input")
        shown = "" if item["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar/flow value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. learner.lr=3e-4")
    parts = [p for p in key.strip().split(".")]
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty path segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b=c` override set (creating sub-tables as needed)."""
    out: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain mapping (already merged) into a RunConfig."""
    merged = _deep_copy(data)
    password = os.environ.get(REDIS_PASSWORD_ENV)
    if password and not (merged.get("redis") or {}).get("password"):
        merged.setdefault("redis", {})["password"] = password
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load YAML at `path` (or the built-in defaults when None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    overrides = list(overrides)
    if overrides:
        source += " + --set " + " ".join(overrides)
    return config_from_dict(apply_overrides(data, overrides), source)


def dump_config(config: RunConfig) -> str:
    """YAML of a config (secrets masked), e.g. for the Helm ConfigMap or a run's report."""
    data = config.model_dump(mode="json")
    if data.get("redis", {}).get("password") is not None:
        data["redis"]["password"] = "**********"
    return yaml.safe_dump(data, sort_keys=False)
