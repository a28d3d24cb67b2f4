"""Typed dataclass configs from TOML + flags (STYLE.md #2): shared by coordinator and edge client."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any


def option(default, help: str, **kw):
    """A dataclass field with a help string (shown by ``--help`` tables and docs)."""
    if "default_factory" in kw:
        return dataclasses.field(metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def load_config(cls, path: str | Path | None, table: str, overrides: dict[str, Any]):
    """``cls`` from an optional TOML file (keys flat or under ``[table]``) with non-None overrides.

    Unknown keys and wrongly typed values raise ValueError naming the field; the dataclass's own
    ``__post_init__`` validates the values.
    """
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "config"
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    if isinstance(data.get(table), dict):
        data = dict(data[table])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(cls, data, source)


def from_mapping(cls, data: dict[str, Any], source: str = "config"):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(fields)}")
    data = dict(data)
    for key, value in data.items():
        f = fields[key]
        want = type(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return cls(**data)
