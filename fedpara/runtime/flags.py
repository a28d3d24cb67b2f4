"""Command-line flags generated from config dataclasses, and the broker flags every command shares.

A config field ``round_deadline_s`` becomes ``--round-deadline-s`` (or the field's own ``flag``
from :func:`~fedpara.runtime.options.option`), typed after its default, with the field's help
text; booleans get ``--x`` / ``--no-x``. Flags default to None so that only what was given
overrides the TOML file (:func:`~fedpara.runtime.options.load_config`).
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .mqtt import BrokerURL, parse_broker_url
from .options import field_type


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (),
                     defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per field of ``cls`` (except ``skip`` and dict fields, which only TOML sets).

    ``defaults`` are shown in the help text in place of the dataclass's (the demo's own)."""
    skip, defaults = set(skip), dict(defaults or {})
    for f in dataclasses.fields(cls):
        typ = field_type(f)
        if f.name in skip or typ is dict:
            continue
        default = defaults.get(f.name, f.default)
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if typ is bool:
            p.add_argument(flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
        else:
            p.add_argument(flag_name(f), dest=f.name, type=typ, default=None, metavar=f.name.upper(),
                           help=help_text)


def config_overrides(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags (not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def add_broker_arguments(p: argparse.ArgumentParser, default: str | None = "mqtt://127.0.0.1:1883") -> None:
    """The broker flags every command shares."""
    p.add_argument("--broker", default=default, help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--username", help="MQTT user (or FEDPARA_MQTT_USERNAME)")
    p.add_argument("--password", help="MQTT password (prefer FEDPARA_MQTT_PASSWORD)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")


def broker_from_args(args) -> BrokerURL:
    return parse_broker_url(args.broker, username=args.username, password=args.password, ca_file=args.ca_file)
