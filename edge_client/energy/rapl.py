"""Intel/AMD RAPL energy counters through the Linux powercap sysfs interface.

Layout (``/sys/class/powercap``)::

    intel-rapl:0/name                 "package-0"
    intel-rapl:0/energy_uj            cumulative micro-joules, wraps at max_energy_range_uj
    intel-rapl:0/max_energy_range_uj
    intel-rapl:0:0/name               "core" | "uncore" | "dram"   (sub-zones; also nested
    intel-rapl:0:1/...                                               under intel-rapl:0/)
    intel-rapl:1/name                 "psys" on some laptops (whole SoC platform)

We sum every ``package-N`` zone plus ``dram`` sub-zones (DRAM is not part of the package
counter); ``core``/``uncore`` are inside the package and ``psys`` overlaps it, so they are not
added (``psys`` is used alone only when there is no package zone). AMD Zen CPUs expose the same
files through the same driver since Linux 5.8.

Since Linux 5.10 (CVE-2020-8694, "Platypus") ``energy_uj`` is readable by root only; the
:class:`MeterUnavailable` message says how to grant read access. Counters wrap at
``max_energy_range_uj``; a background thread reads them every ``poll_s`` seconds so that a long
phase cannot wrap more than once between two reads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import (
    EnergyError,
    EnergyMeter,
    EnergyReading,
    MeterUnavailable,
    TextReader,
    default_read_text,
)

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/class/powercap"
_TOP = re.compile(r"^intel-rapl:(\d+)$")
_SUB = re.compile(r"^intel-rapl:(\d+):(\d+)$")


def rapl_permission_hint(path: Path | str) -> str:
    """How to let a non-root user read a RAPL counter (used in error messages and docs)."""
    return (
        f"permission denied reading {path} (root-only since Linux 5.10). Grant read access with "
        f"'sudo chmod o+r {path}' (until reboot) or persistently with a udev rule, e.g. "
        "/etc/udev/rules.d/99-rapl.rules: "
        'ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", '
        'RUN+="/bin/chmod o+r /sys%p/energy_uj"'
    )


def counter_delta(start: int, end: int, max_range: int) -> int:
    """Micro-joules between two reads of a counter that wraps to 0 after ``max_range``. Pure."""
    if end >= start:
        return end - start
    return end + (max_range - start)


@dataclass(frozen=True)
class RaplZone:
    name: str  # "package-0", "dram", "psys", ...
    path: Path  # directory holding energy_uj
    max_range_uj: int
    top_level: bool


def discover_zones(root: Path, read_text: TextReader = default_read_text) -> list[RaplZone]:
    """All RAPL zones under ``root`` (top-level and sub-zones, flat or nested), sorted."""
    found: dict[str, Path] = {}
    for pattern in ("intel-rapl:*", "intel-rapl:*/intel-rapl:*"):
        for p in root.glob(pattern):
            if (_TOP.match(p.name) or _SUB.match(p.name)) and p.name not in found:
                found[p.name] = p
    zones = []
    for dirname in sorted(found, key=lambda n: [int(x) for x in n.split(":")[1:]]):
        p = found[dirname]
        try:
            name = read_text(p / "name").strip()
            max_range = int(read_text(p / "max_energy_range_uj").strip())
        except FileNotFoundError:
            log.debug("RAPL zone %s lacks name/max_energy_range_uj; skipped", p)
            continue
        except PermissionError as exc:
            raise MeterUnavailable(rapl_permission_hint(exc.filename or p / "max_energy_range_uj")) from exc
        except ValueError as exc:
            log.debug("RAPL zone %s unreadable (%s); skipped", p, exc)
            continue
        zones.append(RaplZone(name, p, max_range, bool(_TOP.match(dirname))))
    return zones


def select_zones(zones: list[RaplZone]) -> list[RaplZone]:
    """Packages + DRAM; psys only when no package exists. Pure."""
    packages = [z for z in zones if z.top_level and z.name.startswith("package")]
    dram = [z for z in zones if z.name == "dram"]
    if packages:
        return packages + dram
    psys = [z for z in zones if z.top_level and z.name == "psys"]
    return psys + dram if psys else dram


class RaplMeter(EnergyMeter):
    """Sum of RAPL package (+DRAM) energy counters. Source e.g. ``rapl:package-0+dram``."""

    measured = True

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        *,
        poll_s: float = 10.0,
        read_text: TextReader = default_read_text,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.root = Path(root)
        self.poll_s = float(poll_s)
        self._read_text = read_text
        self._clock = clock
        if not self.root.is_dir():
            raise MeterUnavailable(f"no powercap directory {self.root} (not Linux, or no RAPL driver)")
        self.zones = select_zones(discover_zones(self.root, read_text))
        if not self.zones:
            raise MeterUnavailable(
                f"no RAPL package/dram zones under {self.root} "
                "(CPU without RAPL, intel_rapl module not loaded, or hidden by a VM/container)"
            )
        names = list(dict.fromkeys(z.name for z in self.zones))
        self.source = "rapl:" + "+".join(names)
        self._read_all()  # probe now: permission errors surface at construction with the hint
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    def _read_all(self) -> list[int]:
        values = []
        for z in self.zones:
            path = z.path / "energy_uj"
            try:
                values.append(int(self._read_text(path).strip()))
            except PermissionError as exc:
                raise MeterUnavailable(rapl_permission_hint(path)) from exc
            except (OSError, ValueError) as exc:
                raise EnergyError(f"{self.source}: cannot read {path}: {exc}") from exc
        return values

    def _accumulate(self) -> None:
        now = self._read_all()
        with self._lock:
            for i, (z, prev, cur) in enumerate(zip(self.zones, self._prev, now, strict=True)):
                if cur < prev:
                    self._wraps += 1
                self._acc_uj[i] += counter_delta(prev, cur, z.max_range_uj)
            self._prev = now

    def _run(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self._accumulate()
            except EnergyError as exc:  # retried at the next poll / at stop()
                log.warning("%s: %s", self.source, exc)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self!r} already started")
        self._prev = self._read_all()
        self._acc_uj = [0] * len(self.zones)
        self._wraps = 0
        self._t0 = self._clock()
        self._halt.clear()
        self._thread = threading.Thread(target=self._run, name="energy-rapl", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        if self._thread is None:
            raise RuntimeError(f"{self!r} stopped without start()")
        self._halt.set()
        self._thread.join(timeout=5.0)
        self._thread = None
        self._accumulate()
        seconds = self._clock() - self._t0
        per_zone: dict[str, float] = {}
        for z, uj in zip(self.zones, self._acc_uj, strict=True):
            key = z.name if z.name not in per_zone else f"{z.name}@{z.path.name}"
            per_zone[key] = uj / 1e6
        joules = sum(self._acc_uj) / 1e6
        return EnergyReading(joules, seconds, self.source, True, {"zones_j": per_zone, "wraps": self._wraps})

    def close(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join(timeout=5.0)
            self._thread = None
