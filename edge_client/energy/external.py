"""An external meter (USB power meter, smart plug, lab supply) read through a command or a file.

Either source yields one number per read, taken as the last number on the last non-empty line
(so both ``12.5`` and a CSV log line ``1718000000.12,12.5`` work):

* ``quantity="power_w"``: instantaneous watts, polled every ``interval_s`` and integrated
  (trapezoid);
* ``quantity="energy_j"``: a cumulative joule counter, read at start and stop and differenced.

``scale`` converts the printed unit (e.g. 1e-3 for mW, 3600 for Wh, 3.6e6 for kWh). The
command is split with :func:`shlex.split` and run without a shell; it must finish within
``timeout_s``. A file is re-read at every sample (an appending logger or a value file both work).
Sources: ``external-cmd`` and ``external-file``.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from .base import EnergyError, EnergyMeter, EnergyReading, MeterUnavailable
from .sampling import PollingMeter

log = logging.getLogger(__name__)

QUANTITIES = ("power_w", "energy_j")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_TAIL_BYTES = 4096


def parse_last_number(text: str) -> float:
    """The last number on the last non-empty line. Raises ValueError when there is none. Pure."""
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            nums = _NUMBER.findall(line)
            if not nums:
                raise ValueError(f"no number in {line.strip()[:80]!r}")
            return float(nums[-1])
    raise ValueError("empty output")


def command_reader(command: str | Sequence[str], timeout_s: float = 5.0) -> Callable[[], float]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise MeterUnavailable("external command is empty")

    def read() -> float:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EnergyError(f"external command timed out after {timeout_s}s") from exc
        if proc.returncode != 0:
            raise EnergyError(f"external command exited {proc.returncode}: {proc.stderr.strip()[:200]}")
        return parse_last_number(proc.stdout)

    return read


def file_reader(path: str | Path) -> Callable[[], float]:
    p = Path(path)

    def read() -> float:
        with open(p, "rb") as fh:  # only the tail: the file may be a growing log
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            return parse_last_number(fh.read().decode("utf-8", errors="replace"))

    return read


class ExternalPowerMeter(PollingMeter):
    measured = True

    def __init__(self, read: Callable[[], float], source: str, interval_s: float = 1.0, scale: float = 1.0):
        super().__init__(interval_s)
        self._read, self.source, self.scale = read, source, float(scale)

    def _read_watts(self) -> float:
        return self._read() * self.scale


class ExternalEnergyMeter(EnergyMeter):
    measured = True

    def __init__(
        self,
        read: Callable[[], float],
        source: str,
        scale: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._read, self.source, self.scale, self._clock = read, source, float(scale), clock
        self._start: tuple[float, float] | None = None

    def _joules(self) -> float:
        try:
            return self._read() * self.scale
        except (OSError, ValueError) as exc:
            raise EnergyError(f"{self.source}: {exc}") from exc

    def start(self) -> None:
        self._start = (self._clock(), self._joules())

    def stop(self) -> EnergyReading:
        if self._start is None:
            raise RuntimeError(f"{self!r} stopped without start()")
        (t0, e0), self._start = self._start, None
        e1 = self._joules()
        detail: dict = {}
        if e1 < e0:
            log.warning("%s: energy counter went backwards (%s -> %s J); reporting 0", self.source, e0, e1)
            detail["counter_reset"] = True
        return EnergyReading(max(0.0, e1 - e0), self._clock() - t0, self.source, True, detail)


def external_meter(
    *,
    command: str | Sequence[str] | None = None,
    path: str | Path | None = None,
    quantity: str = "power_w",
    interval_s: float = 1.0,
    scale: float = 1.0,
    timeout_s: float = 5.0,
) -> EnergyMeter:
    """Build the meter for a command or a file (exactly one) and probe it once."""
    if (command is None) == (path is None):
        raise MeterUnavailable("external meter needs exactly one of a command or a file")
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if command is not None:
        read, source = command_reader(command, timeout_s), "external-cmd"
    else:
        read, source = file_reader(path), "external-file"  # type: ignore[arg-type]
    try:
        read()
    except FileNotFoundError as exc:
        raise MeterUnavailable(f"{source}: {exc.filename or exc} not found") from exc
    except PermissionError as exc:
        raise MeterUnavailable(
            f"{source}: permission denied ({exc}); make it readable/executable for this user (chmod o+r / o+x)"
        ) from exc
    except (OSError, ValueError, EnergyError) as exc:
        raise MeterUnavailable(f"{source}: first read failed: {exc}") from exc
    if quantity == "power_w":
        return ExternalPowerMeter(read, source, interval_s, scale)
    return ExternalEnergyMeter(read, source, scale)
