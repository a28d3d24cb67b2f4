"""Sum of several meters that see disjoint parts of the machine (e.g. NVML GPU + RAPL CPU)."""

from __future__ import annotations

import logging
from typing import Sequence

from .base import EnergyError, EnergyMeter, EnergyReading

log = logging.getLogger(__name__)


class SumMeter(EnergyMeter):
    """Starts/stops every part together; joules add up. Source ``a+b`` of the parts' sources."""

    def __init__(self, parts: Sequence[EnergyMeter]):
        if not parts:
            raise ValueError("parts: need at least one meter")
        self.parts = list(parts)
        self.source = "+".join(p.source for p in self.parts)
        self.measured = all(p.measured for p in self.parts)

    def start(self) -> None:
        started: list[EnergyMeter] = []
        try:
            for p in self.parts:
                p.start()
                started.append(p)
        except Exception:
            for p in started:  # do not leave sampler threads behind
                try:
                    p.stop()
                except Exception as exc:
                    log.debug("stopping %s after failed start: %s", p.source, exc)
            raise

    def stop(self) -> EnergyReading:
        readings: list[EnergyReading] = []
        errors: list[str] = []
        for p in self.parts:  # stop all, even after a failure
            try:
                readings.append(p.stop())
            except EnergyError as exc:
                errors.append(f"{p.source}: {exc}")
        if errors:
            raise EnergyError("; ".join(errors))
        detail = {r.source: {"joules": r.joules, **r.detail} for r in readings}
        seconds = max(r.seconds for r in readings)
        return EnergyReading(sum(r.joules for r in readings), seconds, self.source, self.measured, detail)

    def close(self) -> None:
        for p in self.parts:
            p.close()
