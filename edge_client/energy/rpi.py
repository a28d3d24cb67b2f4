"""Raspberry Pi 5 PMIC (Renesas DA9091) rail telemetry via ``vcgencmd pmic_read_adc``.

The firmware prints one line per ADC channel, currents then voltages::

       VDD_CORE_A current(7)=2.51620000A
       ...
       VDD_CORE_V volt(15)=0.76242820V
          EXT5V_V volt(24)=5.14993000V

Power is the sum over rails that have both a current (``<RAIL>_A``) and a voltage
(``<RAIL>_V``) of I * V. Inputs without a current (``EXT5V_V``, ``BATT_V``) are ignored. The
sum covers the PMIC's output rails, so it misses the PMIC's own conversion losses and whatever
the USB ports and HATs draw from 5 V directly: it under-reads wall power (by roughly 10-30 %,
more with USB devices attached). Older Pis have no PMIC ADC: the meter is unavailable there.

``vcgencmd`` talks to the firmware through ``/dev/vcio``; a user outside the ``video`` group
gets "VCHI initialization failed" - the error message says ``sudo usermod -aG video $USER``.
Each sample spawns a process (~10-20 ms of CPU), so the default interval is longer (0.5 s).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from typing import Callable

from .base import EnergyError, MeterUnavailable
from .sampling import PollingMeter

log = logging.getLogger(__name__)

_LINE = re.compile(
    r"^\s*(?P<rail>[A-Za-z0-9_]+?)_(?P<kind>[AV])(?:\s+\w+\(\d+\))?\s*=\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*[AV]?\s*$"
)
PERMISSION_HINT = "add the user to the 'video' group: sudo usermod -aG video $USER (then log in again)"


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Rail -> watts for every rail with a matched current/voltage pair. Pure."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


class RpiPmicMeter(PollingMeter):
    """Sum of the Pi 5 PMIC rail powers, polled through vcgencmd. Source ``rpi5-pmic``."""

    source = "rpi5-pmic"
    measured = True

    def __init__(
        self,
        vcgencmd: str = "vcgencmd",
        interval_s: float = 0.5,
        *,
        timeout_s: float = 5.0,
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    ):
        super().__init__(interval_s)
        exe = shutil.which(vcgencmd)
        if exe is None:
            raise MeterUnavailable(f"{vcgencmd!r} not found on PATH (not a Raspberry Pi OS install?)")
        self.argv = [exe, "pmic_read_adc"]
        self.timeout_s = float(timeout_s)
        self._runner = run
        self._rails: dict[str, float] = {}
        try:
            rails = self._read_rails()
        except PermissionError as exc:
            raise MeterUnavailable(f"cannot run {exe}: {exc}; {PERMISSION_HINT}") from exc
        except (OSError, EnergyError) as exc:
            raise MeterUnavailable(str(exc)) from exc
        if not rails:
            raise MeterUnavailable(f"'{exe} pmic_read_adc' printed no rail current/voltage pairs (not a Pi 5?)")
        self.rail_names = sorted(rails)

    def _read_rails(self) -> dict[str, float]:
        try:
            proc = self._runner(self.argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EnergyError(f"{self.argv[0]} pmic_read_adc timed out after {self.timeout_s}s") from exc
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout or "").strip()
            hint = f"; {PERMISSION_HINT}" if re.search(r"VCHI|vcio|ermission", err) else ""
            raise EnergyError(f"{self.argv[0]} pmic_read_adc exited {proc.returncode}: {err[:200]}{hint}")
        return parse_pmic_adc(proc.stdout)

    def _read_watts(self) -> float:
        rails = self._read_rails()
        if not rails:
            raise EnergyError("pmic_read_adc printed no rails")
        return sum(rails.values())

    def _extra_detail(self) -> dict:
        return {"rails": self.rail_names}
