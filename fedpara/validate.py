"""Validators shared by the method, the wire format, the runtime and the apps: one spelling each.

Each returns the value and raises ``ValueError("<name>: ...")`` naming what was wrong, so that a
config error, a bad layer argument and a bad message field all read the same way.
"""
from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """An int (not a bool) in ``[min, max]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name}: must be in [{min if min is not None else '-inf'}, "
                         f"{max if max is not None else 'inf'}], got {value!r}")
    return value


def check_number(name: str, value: Any, *, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False) -> float:
    """A finite int or float (not a bool) in the interval; ``*_open`` excludes the bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    low_bad = min is not None and (value <= min if min_open else value < min)
    high_bad = max is not None and (value >= max if max_open else value > max)
    if low_bad or high_bad:
        lo = "-inf" if min is None else f"{'(' if min_open else '['}{min}"
        hi = "inf" if max is None else f"{max}{')' if max_open else ']'}"
        lo = lo if lo != "-inf" else "(-inf"
        hi = hi if hi != "inf" else "inf)"
        raise ValueError(f"{name}: must be in {lo}, {hi}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices) -> Any:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false, got {value!r}")
    return value


def check_str(name: str, value: Any, *, max_len: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise ValueError(f"{name}: must be a string of at most {max_len} characters, got {value!r:.80}")
    return value


def check_device(name: str, value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    ok = isinstance(value, str) and (value in ("auto", "cpu", "cuda") or
                                     (value.startswith("cuda:") and value[5:].isdigit()))
    if not ok:
        raise ValueError(f"{name}: expected auto, cpu or cuda[:N], got {value!r}")
    return value
