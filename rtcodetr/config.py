"""Typed configuration: dataclass defaults <- one YAML file <- ``key=value`` overrides.

Every stage describes its settings as a (possibly nested) dataclass. ``load_config`` layers a YAML file and command
line overrides on top of the defaults, checks every key against the dataclass fields and coerces values to the
declared types. An unknown key is an error that names the key, where it came from and the closest valid key.

    cfg = load_config(TrainConfig, "configs/distill.yaml", ["max_steps=200", "loss.feature_weight=0"])
    save_config(cfg, run_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from rtcodetr.errors import InputError

T = TypeVar("T")


class ConfigError(ValueError, InputError):
    """A configuration key or value is invalid; the message names the key and its source."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, valid: Iterable[str], source: str, prefix: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(prefix + v for v in valid)}"
    return ConfigError(f"unknown config key '{prefix}{key}' (from {source}){hint}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce a YAML/CLI value to the declared type ``tp``; raise ConfigError naming ``key`` when impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' (from {source}): {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads the words no/yes/off/on as booleans: `mixed_precision=no` must stay the string 'no'
            spelled = {False: ("no", "false", "off"), True: ("yes", "true", "on")}[value]
            value = next((a for a in args if isinstance(a, str) and a.lower() in spelled), value)
        if value not in args:
            raise ConfigError(f"config key '{key}' (from {source}): {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' (from {source}): expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' (from {source}): expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, key, source) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' (from {source}): expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' (from {source}): expected a mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' (from {source}): expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' (from {source}): expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; a float field takes it as the number it obviously is
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' (from {source}): expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' (from {source}): expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def _build(cls: type[T], values: Mapping[str, Any], source: str, prefix: str = "") -> T:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key_error(key, types_, source, prefix)
        kwargs[key] = _coerce(value, types_[key], prefix + key, source)
    return cls(**kwargs)


def _merge(cfg: T, values: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Return a copy of dataclass ``cfg`` with ``values`` (a nested mapping) applied on top."""
    types_ = _field_types(type(cfg))
    changes = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key_error(key, types_, source, prefix)
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = _merge(current, value, source, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, types_[key], prefix + key, source)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=[1, 2]", "name=x"]`` into a nested mapping; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a field inside the non-mapping key '{part}'")
        node[parts[-1]] = value
    return tree


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file ``path`` (if any), then ``key=value`` overrides."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at its top level")
        cfg = _merge(cfg, values, source=str(path))
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), source="the command line")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-safe dict of a config dataclass (Paths and tuples become strings and lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what ran, next to what it produced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` words from argparse flags in ``argv`` (flags stay in order)."""
    flags, overrides = [], []
    for word in argv:
        if "=" in word and not word.startswith("-"):
            overrides.append(word)
        else:
            flags.append(word)
    return flags, overrides
