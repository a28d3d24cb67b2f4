"""Typed options: one way to declare a config field, one set of validators, TOML loading.

Every service config is a dataclass whose fields are declared with :func:`option` (default, help
text, optionally a flag name) and validated in ``__post_init__`` with the ``check_*`` helpers
(:mod:`fedpara.validate`, re-exported here), which raise ``ValueError`` naming the field. TOML files load into the dataclass; command
line flags are generated from the same fields (:mod:`fedpara.runtime.flags`) and override them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomllib

from fedpara.validate import (  # noqa: F401
    check_bool,
    check_choice,
    check_device,
    check_int,
    check_number,
    check_str,
)


def option(default, help: str, *, flag: str | None = None, **kw):
    """A dataclass field with a help string (``--help``, docs) and an optional flag name."""
    meta = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if "default_factory" in kw:
        return dataclasses.field(metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


# --- loading --------------------------------------------------------------------------------
def load_config(cls, path: str | Path | None, table: str, overrides: dict[str, Any]):
    """``cls`` from an optional TOML file (keys flat or under ``[table]``) with non-None overrides.

    Unknown keys and wrongly typed values raise ValueError naming the field; the dataclass's own
    ``__post_init__`` validates the values.
    """
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "config"
    if path is not None:
        if Path(path).is_dir():
            raise ValueError(f"{path}: is a directory; --config takes a TOML file")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
    if isinstance(data.get(table), dict):
        outside = sorted(k for k in data if k != table)
        if outside:  # keys beside the table would be silently ignored
            raise ValueError(f"{source}: keys {outside} are outside the [{table}] table; put every key "
                             f"under [{table}] or write them all without a table")
        data = dict(data[table])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(cls, data, source)


def from_mapping(cls, data: dict[str, Any], source: str = "config"):
    """``cls(**data)`` after checking key names and value types against the fields' defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(fields)}")
    data = dict(data)
    for key, value in data.items():
        want = field_type(fields[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return cls(**data)


def field_type(f: dataclasses.Field) -> type:
    """The Python type of a field, read off its default."""
    return type(f.default if f.default is not dataclasses.MISSING else f.default_factory())

