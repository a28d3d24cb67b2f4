"""Power polling and trapezoidal integration, shared by the meters that read watts, not joules.

Jetson INA3221 rails, NVML power (GPUs without an energy counter), the Raspberry Pi 5 PMIC and
an external power meter all report instantaneous power. A background thread samples it every
``interval_s`` seconds and the energy is the trapezoidal integral

    E = sum_i (P_i + P_{i+1}) / 2 * (t_{i+1} - t_i)

computed incrementally (O(1) memory however long the phase). A sample is taken at ``start()``
and another at ``stop()``, so even a phase shorter than one interval gets two points; the first
and last readings are held over the few milliseconds between the call and the sample.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import Callable, Iterable

from .base import EnergyError, EnergyMeter, EnergyReading

log = logging.getLogger(__name__)

#: errors a sensor read may raise; anything else is a bug and propagates
READ_ERRORS = (OSError, ValueError, EnergyError)


def trapezoid_joules(samples: Iterable[tuple[float, float]]) -> float:
    """Integrate (time_s, watts) samples, sorted by time, with the trapezoidal rule. Pure."""
    total = 0.0
    prev: tuple[float, float] | None = None
    for t, w in samples:
        if prev is not None:
            total += 0.5 * (prev[1] + w) * (t - prev[0])
        prev = (t, w)
    return total


class PollingMeter(EnergyMeter):
    """Base class: subclasses implement ``_read_watts()`` (raise OSError/ValueError/EnergyError)."""

    def __init__(self, interval_s: float = 0.1, *, clock: Callable[[], float] = time.monotonic):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._reset()

    @abc.abstractmethod
    def _read_watts(self) -> float:
        """Instantaneous total power in W."""

    def _extra_detail(self) -> dict:
        """Meter-specific detail for the reading (e.g. which rails were summed)."""
        return {}

    # -- sampling -----------------------------------------------------------------------------

    @property
    def reads(self) -> int:
        """Reads in this phase so far, failed ones included: how far a running meter has got."""
        with self._lock:
            return self._n + self._errors

    def _reset(self) -> None:
        self._t_start = 0.0
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] | None = None
        self._joules = 0.0
        self._n = 0
        self._errors = 0
        self._w_min = float("inf")
        self._w_max = float("-inf")
        self._first_error: str | None = None

    def _timed_read(self) -> tuple[float, float]:
        t0 = self._clock()
        w = float(self._read_watts())
        t1 = self._clock()
        if w != w or w < 0:  # NaN or negative: a broken sensor, not energy
            raise ValueError(f"implausible power reading {w!r} W")
        return 0.5 * (t0 + t1), w

    def _add(self, t: float, w: float) -> None:
        with self._lock:
            if self._last is not None:
                self._joules += 0.5 * (self._last[1] + w) * (t - self._last[0])
            else:
                self._first = (t, w)
            self._last = (t, w)
            self._n += 1
            self._w_min = min(self._w_min, w)
            self._w_max = max(self._w_max, w)

    def _sample(self) -> None:
        try:
            t, w = self._timed_read()
        except READ_ERRORS as exc:
            with self._lock:
                self._errors += 1
                first = self._first_error is None
                if first:
                    self._first_error = str(exc)
            if first:
                log.warning("%s: sample failed (%s); continuing", self.source, exc)
            return
        self._add(t, w)

    def _sampler_loop(self) -> None:
        while not self._halt.wait(self.interval_s):
            self._sample()

    # -- EnergyMeter ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self!r} already started")
        self._reset()
        self._t_start = self._clock()
        try:
            t, w = self._timed_read()
        except READ_ERRORS as exc:
            raise EnergyError(f"{self.source}: cannot read power: {exc}") from exc
        self._add(t, w)
        self._halt.clear()
        self._thread = threading.Thread(target=self._sampler_loop, name=f"energy-{self.source}", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        if self._thread is None:
            raise RuntimeError(f"{self!r} stopped without start()")
        self._halt.set()
        self._thread.join(timeout=max(5.0, 3 * self.interval_s))
        if self._thread.is_alive():
            log.warning("%s: sampler thread did not stop in time", self.source)
        self._thread = None
        self._sample()  # final point
        t_end = self._clock()
        with self._lock:
            seconds = t_end - self._t_start
            if self._n == 0:
                raise EnergyError(f"{self.source}: no power samples ({self._first_error})")
            # hold the first/last power over the edges so the integral spans exactly
            # [start(), stop()] (a sample is timestamped mid-read, a read can take ms)
            joules = (
                self._joules
                + self._first[1] * max(0.0, self._first[0] - self._t_start)
                + self._last[1] * max(0.0, t_end - self._last[0])
            )
            detail = {
                "samples": self._n,
                "sample_errors": self._errors,
                "interval_s": self.interval_s,
                "watts_min": self._w_min,
                "watts_max": self._w_max,
            }
        detail.update(self._extra_detail())
        return EnergyReading(joules, seconds, self.source, self.measured, detail)

    def close(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join(timeout=max(5.0, 3 * self.interval_s))
            self._thread = None
