"""Analytic energy estimate: compute time x configured watts, plus bytes x joules/byte for the radio.

Used where no sensor is readable, and alongside every sensor as a cross-check (``estimate_j``).

    compute_j = cpu_seconds * cpu_watts_per_busy_core      (process CPU time, all threads)
              + gpu_seconds * gpu_watts                     (caller-measured GPU busy time)
              + wall_seconds * idle_watts                   (board baseline while the phase runs)
    radio_j   = bytes_sent * J_per_byte_up + bytes_received * J_per_byte_down
              + tail_j (once per phase with traffic; the LTE RRC tail)

ALL CONSTANTS BELOW ARE APPROXIMATIONS taken from published measurements of other hardware; they
give the order of magnitude, not a measurement of this device. Calibrate ``cpu_watts`` and
``idle_watts`` with a USB power meter where it matters (see docs/energy.md).

Radio, per byte (Huang et al., "A Close Examination of Performance and Power Characteristics of
4G LTE Networks", MobiSys 2012, power model table: alpha_u / alpha_d in mW per Mbit/s, i.e.
mJ per Mbit; J/byte = alpha * 8e-9):
    LTE   alpha_u 438.39, alpha_d 51.97  -> 3.51e-6 / 4.16e-7 J/B; tail ~11.6 s at ~1.06 W ~ 12.3 J
    WiFi  alpha_u 283.17, alpha_d 137.01 -> 2.27e-6 / 1.10e-6 J/B; sub-second tail, not modelled
The model's base power while the radio is active (beta) is not added: the phase's idle_watts
term stands in for it. Ethernet: ~0.5 W for a 1000BASE-T PHY at line rate (figures quoted in the
IEEE 802.3az / Energy-Efficient Ethernet literature, Christensen et al., IEEE Communications
Magazine 2010) over 1.25e8 B/s -> ~4e-9 J/B each way.

Compute (watts per fully busy core above idle, idle board watts): in line with widely published
wall-power bench measurements of these boards (e.g. Raspberry Pi 4 ~2.7 W idle / ~6.4 W with four
cores busy; Pi 5 ~2.7 W idle / ~7.5 W); laptop and Jetson figures are typical of 15-28 W-class
mobile CPUs and the Orin Nano 15 W mode respectively.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import EnergyMeter, EnergyReading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceProfile:
    cpu_watts: float  # W per fully busy core, above idle
    idle_watts: float  # W, whole board at idle
    gpu_watts: float  # W while the GPU is busy, above idle (0: no GPU)
    note: str


@dataclass(frozen=True)
class LinkProfile:
    j_per_byte_up: float
    j_per_byte_down: float
    tail_j: float  # per phase that moved any bytes
    note: str


def _per_byte(mw_per_mbps: float) -> float:
    """mW per Mbit/s == mJ per Mbit -> J per byte."""
    return mw_per_mbps * 8e-9


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "rpi4": DeviceProfile(0.95, 2.7, 0.0, "Raspberry Pi 4B: ~2.7 W idle, ~6.5 W four cores busy"),
    "rpi5": DeviceProfile(1.2, 2.7, 0.0, "Raspberry Pi 5: ~2.7 W idle, ~7.5 W four cores busy"),
    "jetson": DeviceProfile(1.0, 4.5, 7.0, "Jetson Orin Nano, 15 W mode"),
    "laptop": DeviceProfile(4.0, 6.0, 35.0, "15-28 W-class mobile CPU; 35 W mobile GPU"),
}

LINK_PROFILES: dict[str, LinkProfile] = {
    "wifi": LinkProfile(_per_byte(283.17), _per_byte(137.01), 0.0, "Huang et al. MobiSys 2012, WiFi"),
    "lte": LinkProfile(_per_byte(438.39), _per_byte(51.97), 11.576 * 1.06, "Huang et al. MobiSys 2012, LTE"),
    "ethernet": LinkProfile(4e-9, 4e-9, 0.0, "~0.5 W 1000BASE-T PHY at 1 Gbit/s (802.3az literature)"),
}


def radio_joules(bytes_sent: int, bytes_received: int, link: LinkProfile) -> float:
    """Energy of moving the bytes over the link (per-byte terms + one tail if any traffic). Pure."""
    if bytes_sent < 0 or bytes_received < 0:
        raise ValueError("byte counts must be >= 0")
    j = bytes_sent * link.j_per_byte_up + bytes_received * link.j_per_byte_down
    return j + (link.tail_j if bytes_sent or bytes_received else 0.0)


def compute_joules(
    cpu_seconds: float,
    wall_seconds: float,
    profile: DeviceProfile,
    gpu_seconds: float = 0.0,
) -> float:
    """cpu_s * cpu_watts + gpu_s * gpu_watts + wall_s * idle_watts. Pure."""
    return cpu_seconds * profile.cpu_watts + gpu_seconds * profile.gpu_watts + wall_seconds * profile.idle_watts


def detect_profile(
    model_file: str | Path = "/proc/device-tree/model",
    tegra_file: str | Path = "/etc/nv_tegra_release",
) -> str:
    """Best-guess profile name for this machine: rpi5, rpi4, jetson, else laptop."""
    try:
        model = Path(model_file).read_bytes().decode("ascii", "replace")
    except OSError:
        model = ""
    if "Raspberry Pi 5" in model:
        return "rpi5"
    if "Raspberry Pi" in model:
        return "rpi4"
    if Path(tegra_file).exists() or "NVIDIA Jetson" in model:
        return "jetson"
    return "laptop"


class EstimateMeter(EnergyMeter):
    """Process CPU time (and optional GPU busy time) x configured watts. Source ``estimate``.

    ``gpu_clock``, when given, returns cumulative GPU busy seconds (e.g. from CUDA events); GPU
    time can also be passed per phase to :meth:`extra_joules`. Never raises on start/stop.
    """

    source = "estimate"
    measured = False

    def __init__(
        self,
        profile: DeviceProfile,
        link: LinkProfile = LINK_PROFILES["wifi"],
        *,
        cpu_clock: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        gpu_clock: Callable[[], float] | None = None,
    ):
        self.profile = profile
        self.link = link
        self._cpu_clock, self._clock, self._gpu_clock = cpu_clock, clock, gpu_clock
        self._start: tuple[float, float, float] | None = None

    def _gpu(self) -> float:
        if self._gpu_clock is None:
            return 0.0
        try:
            return float(self._gpu_clock())
        except Exception as exc:  # a user callback must not break the round
            log.warning("gpu_clock failed: %s", exc)
            return 0.0

    def start(self) -> None:
        self._start = (self._clock(), self._cpu_clock(), self._gpu())

    def stop(self) -> EnergyReading:
        if self._start is None:
            raise RuntimeError(f"{self!r} stopped without start()")
        (w0, c0, g0), self._start = self._start, None
        wall = self._clock() - w0
        cpu = max(0.0, self._cpu_clock() - c0)
        gpu = max(0.0, self._gpu() - g0)
        joules = compute_joules(cpu, wall, self.profile, gpu)
        detail = {
            "cpu_s": cpu,
            "gpu_s": gpu,
            "cpu_j": cpu * self.profile.cpu_watts,
            "gpu_j": gpu * self.profile.gpu_watts,
            "idle_j": wall * self.profile.idle_watts,
        }
        return EnergyReading(joules, wall, self.source, False, detail)

    def extra_joules(self, *, gpu_seconds: float = 0.0, bytes_sent: int = 0, bytes_received: int = 0) -> dict:
        """Terms the meter cannot see by itself: caller-reported GPU time and radio traffic."""
        return {
            "reported_gpu_j": max(0.0, gpu_seconds) * self.profile.gpu_watts,
            "radio_j": radio_joules(bytes_sent, bytes_received, self.link),
        }
