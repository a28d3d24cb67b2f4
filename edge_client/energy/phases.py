"""Per-round, per-client energy by phase: download, train, upload.

    pm = PhaseMeter(meter, estimate)
    with pm.phase("download") as ph:
        blob = receive(); ph.bytes_received = len(blob)
    with pm.phase("train"):
        train()
    with pm.phase("upload", bytes_sent=len(update)):
        send(update)
    metrics["energy"] = pm.pop_report()

The estimate runs alongside every measured meter (it only reads two clocks), so each phase also
carries ``estimate_j`` as a cross-check, and a phase whose sensor fails (start or stop) falls
back to the estimate with ``measured: false`` and a ``fallback`` reason: a meter never crashes
the round. Radio energy (bytes x J/byte) is part of ``joules`` only when the estimate is the
source; a board-level sensor (Jetson VDD_IN, Pi PMIC, wall meter) already sees the radio.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from .base import EnergyMeter, EnergyReading
from .estimate import DEVICE_PROFILES, EstimateMeter, detect_profile

log = logging.getLogger(__name__)

PHASES = ("download", "train", "upload")


@dataclass
class PhaseHandle:
    """Yielded by :meth:`PhaseMeter.phase`; set the counts you learn inside the block."""

    name: str
    bytes_sent: int = 0
    bytes_received: int = 0
    gpu_seconds: float = 0.0


class PhaseMeter:
    """Wraps one meter (+ the estimate) and accumulates phase readings for one round."""

    def __init__(self, meter: EnergyMeter, estimate: EstimateMeter | None = None, *, reason: str = ""):
        self.meter = meter
        if estimate is None:
            estimate = meter if isinstance(meter, EstimateMeter) else EstimateMeter(DEVICE_PROFILES[detect_profile()])
        self.estimate = estimate
        self.reason = reason
        self._phases: dict[str, dict[str, Any]] = {}
        self._active: str | None = None

    @property
    def source(self) -> str:
        return self.meter.source

    @contextmanager
    def phase(
        self, name: str, *, bytes_sent: int = 0, bytes_received: int = 0, gpu_seconds: float = 0.0
    ) -> Iterator[PhaseHandle]:
        if self._active is not None:
            raise RuntimeError(f"phase {name!r} started inside phase {self._active!r}")
        handle = PhaseHandle(name, bytes_sent, bytes_received, gpu_seconds)
        separate = self.estimate is not self.meter
        self._active = name
        failure: str | None = None
        if separate:
            self.estimate.start()
        try:
            self.meter.start()
        except Exception as exc:  # any sensor failure: fall back, never crash the round
            failure = f"start failed: {exc}"
            log.warning("energy %s: %s %s; using the estimate for this phase", name, self.meter.source, failure)
        try:
            yield handle
        finally:
            self._active = None
            est = self.estimate.stop()
            reading: EnergyReading | None = None
            if separate and failure is None:
                try:
                    reading = self.meter.stop()
                except Exception as exc:
                    failure = f"stop failed: {exc}"
                    log.warning("energy %s: %s %s; using the estimate for this phase", name, self.meter.source, failure)
            elif not separate:
                reading = est
            self._record(handle, reading, est, failure)

    def _record(self, h: PhaseHandle, reading: EnergyReading | None, est: EnergyReading, failure: str | None) -> None:
        extra = self.estimate.extra_joules(
            gpu_seconds=h.gpu_seconds, bytes_sent=h.bytes_sent, bytes_received=h.bytes_received
        )
        estimate_j = est.joules + extra["reported_gpu_j"] + extra["radio_j"]
        if reading is not None and reading.measured:
            entry = {"joules": reading.joules, "seconds": reading.seconds, "source": reading.source, "measured": True}
            detail = reading.detail
        else:
            entry = {"joules": estimate_j, "seconds": est.seconds, "source": est.source, "measured": False}
            detail = {**est.detail, **extra}
        entry.update(
            estimate_j=estimate_j,
            radio_j=extra["radio_j"],
            bytes_sent=h.bytes_sent,
            bytes_received=h.bytes_received,
            detail=detail,
        )
        if failure is not None:
            entry["fallback"] = f"{self.meter.source}: {failure}"
        prev = self._phases.get(h.name)
        if prev is not None:  # the same phase twice in a round (e.g. a retried upload): add up
            for k in ("joules", "seconds", "estimate_j", "radio_j", "bytes_sent", "bytes_received"):
                entry[k] += prev[k]
            entry["measured"] = entry["measured"] and prev["measured"]
            if prev["source"] != entry["source"]:
                entry["source"] = f"{prev['source']}|{entry['source']}"
            if "fallback" in prev and "fallback" not in entry:
                entry["fallback"] = prev["fallback"]
        self._phases[h.name] = entry

    def report(self) -> dict[str, Any]:
        """{phase: {joules, seconds, source, measured, ...}, total_j, source, measured} (JSON-safe)."""
        out: dict[str, Any] = {name: dict(entry) for name, entry in self._phases.items()}
        out["total_j"] = sum(e["joules"] for e in self._phases.values())
        out["source"] = self.meter.source
        out["measured"] = bool(self._phases) and all(e["measured"] for e in self._phases.values())
        return out

    def reset(self) -> None:
        self._phases.clear()

    def pop_report(self) -> dict[str, Any]:
        """report() then reset(): call once per round."""
        out = self.report()
        self.reset()
        return out

    def close(self) -> None:
        self.meter.close()
        if self.estimate is not self.meter:
            self.estimate.close()
