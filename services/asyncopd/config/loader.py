"""Loading a RunConfig, with errors that name the field. Layers, later ones winning:

1. the built-in defaults;
2. YAML files, in the order given (`-c base.yaml -c gpu.yaml`): mappings merge key by key,
   anything else (a list, a scalar) is replaced whole;
3. `ASYNCOPD_*` environment variables: `ASYNCOPD_<SECTION>__<FIELD>=value`, `__` between
   levels (`ASYNCOPD_LEARNER__LR=3e-4`, `ASYNCOPD_ROLLOUT__SAMPLING__MAX_TOKENS=4096`), or a
   top-level field (`ASYNCOPD_MAX_STALENESS=2`); values parse as YAML, like `--set`;
4. `--set a.b=c` overrides.

Then each field is validated, and the rules that span fields (`run.cross_field_errors`).

This is the one place that reads the environment for config: the overrides above and the Redis
password (`ASYNCOPD_REDIS_PASSWORD`, so a secret never has to be written into a file that gets
logged or rendered). `ASYNCOPD_*` names without `__` that are not a top-level field (such as
`ASYNCOPD_LOG_LEVEL`) are not config and are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from asyncopd.config.run import RunConfig, cross_field_errors

REDIS_PASSWORD_ENV = "ASYNCOPD_REDIS_PASSWORD"
ENV_PREFIX = "ASYNCOPD_"
ENV_LEVEL_SEPARATOR = "__"
# ASYNCOPD_* variables that are not config overrides.
_NOT_OVERRIDES = frozenset({REDIS_PASSWORD_ENV, "ASYNCOPD_LOG_LEVEL"})

ConfigPaths = str | Path | Sequence[str | Path] | None


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


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: mappings merge key by key (recursively), other values replace."""
    out = _deep_copy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = _deep_copy(value) if isinstance(value, Mapping) else value
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    """`ASYNCOPD_*` environment variables as `a.b=value` overrides (see the module doc), sorted
    by name; ConfigError for a `__` name whose first level is no section or field."""
    return [override for _, override in _env_pairs(os.environ if environ is None else environ)]


def _env_pairs(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _NOT_OVERRIDES:
            continue
        levels = name.removeprefix(ENV_PREFIX).lower().split(ENV_LEVEL_SEPARATOR)
        if levels[0] not in RunConfig.model_fields:
            if len(levels) == 1:
                continue  # not config (e.g. a tool's own setting)
            raise ConfigError(
                f"environment variable {name}: {levels[0]!r} is not a config section; "
                f"sections: {', '.join(sorted(RunConfig.model_fields))}"
            )
        if any(not level for level in levels):
            raise ConfigError(f"environment variable {name}: empty level (use exactly two underscores between levels)")
        out.append((name, f"{'.'.join(levels)}={environ[name]}"))
    return out


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain mapping (already merged) into a RunConfig, cross-field rules included."""
    merged = _deep_copy(data)
    password = os.environ.get(REDIS_PASSWORD_ENV)
    if password and not (merged.get("redis") or {}).get("password"):
        merged.setdefault("redis", {})["password"] = password
    try:
        config = RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    errors = cross_field_errors(config)
    if errors:
        raise ConfigError("\n".join([f"invalid config ({source}):", *(f"  {path}: {msg}" for path, msg in errors)]))
    return config


def _read_yaml(path: str | Path) -> dict[str, Any]:
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
    return loaded


def load_config(path: ConfigPaths = None, overrides: Iterable[str] = (), *, environ: bool = True) -> RunConfig:
    """Defaults, then the YAML file(s) at `path` (one path, or several merged in order), then
    `ASYNCOPD_*` environment overrides (unless `environ` is False), then `--set` overrides."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    data: dict[str, Any] = {}
    for p in paths:
        data = merge(data, _read_yaml(p))
    source = " + ".join(str(p) for p in paths) or "defaults"
    from_env = _env_pairs(os.environ) if environ else []
    if from_env:  # names only: a value may be a secret
        source += " + environment " + " ".join(name for name, _ in from_env)
    overrides = list(overrides)
    if overrides:
        source += " + --set " + " ".join(overrides)
    return config_from_dict(apply_overrides(data, [*(o for _, o in from_env), *overrides]), source)


def dump_config(config: RunConfig) -> str:
    """YAML of a config (secrets masked), e.g. for the Helm ConfigMap or a run's report."""
    data = config.model_dump(mode="json")
    if data.get("redis", {}).get("password") is not None:
        data["redis"]["password"] = "**********"
    return yaml.safe_dump(data, sort_keys=False)
