"""Typed dataclasses from plain data (JSON, YAML, manifests, cards): unknown keys and wrong
types are errors that name the key. Used by the config, the data layer and the jobs.

    cfg = parse_dataclass(DataSection, {"augment": "no"})   # augment=False
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config that must not be submitted; the message names the key and the fix."""


BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean.
            value = {False: "off", True: "on"}[value] if {"off", "on"} & set(get_args(tp)) else value
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if origin is dict:
            k_tp, v_tp = get_args(tp)
            return {_coerce(k_tp, k, key): _coerce(v_tp, v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def parse_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data: unknown keys and wrong types raise ConfigError."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}: {where} takes {', '.join(sorted(known))}"
        )
    missing = sorted(f.name for f in fields(cls) if f.name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{where} needs {', '.join(prefix + m for m in missing)}")
    kwargs = {}
    for name in known & set(data):
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = parse_dataclass(tp, data[name], f"{key}.")
        else:
            kwargs[name] = _coerce(tp, data[name], key)
    return cls(**kwargs)
