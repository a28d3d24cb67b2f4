"""The one small interface every energy meter implements.

A meter is started before a phase of a federated round (download, train, upload) and stopped
after it; ``stop()`` returns an :class:`EnergyReading` with the joules spent in between and a
``source`` label saying where the number came from ("rapl:package-0+dram", "estimate", ...).
Hardware meters set ``measured = True``; the analytic estimate sets ``measured = False``.

Failures are values or typed exceptions, never crashes of the client:
:class:`MeterUnavailable` when a meter cannot be built on this device (missing sensor, missing
optional dependency, permission denied - the message says how to grant access), and
:class:`EnergyError` when a running meter loses its sensor; :class:`~.phases.PhaseMeter` then
falls back to the estimate for that phase.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Reads a (sysfs) text file. Injected in tests to simulate permission errors as root.
TextReader = Callable[[Path], str]


class EnergyError(RuntimeError):
    """A meter failed while measuring (sensor vanished, counter unreadable)."""


class MeterUnavailable(EnergyError):
    """A meter cannot be used on this device; the message says why and, where possible, how to fix it."""


def default_read_text(path: Path) -> str:
    """Read a small sysfs file. Kept as a module-level function so tests can inject another."""
    with open(path, encoding="ascii", errors="replace") as fh:
        return fh.read()


@dataclass(frozen=True)
class EnergyReading:
    """Energy spent between ``start()`` and ``stop()``.

    joules:   energy in J (float, >= 0 for meters that behave).
    seconds:  wall-clock duration of the interval (monotonic clock).
    source:   label of the meter that produced it.
    measured: True for hardware sensors, False for the analytic estimate.
    detail:   meter-specific extras (per-zone joules, mean watts, sample count, ...), JSON-safe.
    """

    joules: float
    seconds: float
    source: str
    measured: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0


class EnergyMeter(abc.ABC):
    """start() ... stop() -> EnergyReading. Not re-entrant: one interval at a time."""

    #: label such as "rapl:package-0+dram", "jetson-ina3221:VDD_IN", "estimate"
    source: str = "unknown"
    #: False only for estimates
    measured: bool = True

    @abc.abstractmethod
    def start(self) -> None:
        """Begin an interval. Raises EnergyError if the sensor cannot be read."""

    @abc.abstractmethod
    def stop(self) -> EnergyReading:
        """End the interval started by start() and return its energy. Raises EnergyError."""

    def close(self) -> None:
        """Release resources (threads, libraries). Safe to call more than once."""

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r})"
