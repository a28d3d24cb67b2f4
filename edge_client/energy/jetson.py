"""NVIDIA Jetson on-board INA3221 power monitors, read from sysfs and integrated over time.

Two layouts exist, both supported:

* L4T r32 / JetPack 4 (Nano, TX2, Xavier), IIO driver ``ina3221x``::

      /sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<N>/rail_name_<i>      "VDD_IN" / "POM_5V_IN"
      .../in_power<i>_input   mW      .../in_current<i>_input  mA      .../in_voltage<i>_input  mV

* L4T r34+ / JetPack 5-6 (Orin), mainline hwmon driver ``ina3221``::

      /sys/class/hwmon/hwmon<N>/name            "ina3221"
      .../in<c>_label   "VDD_IN"    .../in<c>_input  bus voltage mV    .../curr<c>_input  mA
      (.../in<c>_enable "0" for a disabled channel; in4-in7 are shunt/sum voltages, no curr)

Power per rail is ``in_power`` where exposed, otherwise P = V * I. The board total is the input
rail (``VDD_IN``, or ``POM_5V_IN`` on the Nano) where present; otherwise the sum of all rails
(e.g. AGX Orin), which is an approximation that the ``source`` label spells out.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .base import MeterUnavailable, TextReader, default_read_text
from .sampling import PollingMeter

log = logging.getLogger(__name__)

DEFAULT_ROOTS = ("/sys/bus/i2c/drivers/ina3221x", "/sys/class/hwmon")
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
_SKIP_LABELS = {"", "NC", "N/A"}


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel. Exactly one of ``power_file`` or (``volt_file``, ``curr_file``) is used."""

    label: str
    power_file: Path | None  # mW (iio layout)
    volt_file: Path | None  # mV
    curr_file: Path | None  # mA

    def watts(self, read_text: TextReader) -> float:
        if self.power_file is not None:
            return float(read_text(self.power_file).strip()) / 1e3
        mv = float(read_text(self.volt_file).strip())  # type: ignore[arg-type]
        ma = float(read_text(self.curr_file).strip())  # type: ignore[arg-type]
        return mv * ma / 1e6


def _iio_rails(dev: Path, read_text: TextReader) -> list[Rail]:
    rails = []
    for name_file in sorted(dev.glob("rail_name_*")):
        i = name_file.name.rsplit("_", 1)[1]
        label = read_text(name_file).strip()
        power = dev / f"in_power{i}_input"
        volt, curr = dev / f"in_voltage{i}_input", dev / f"in_current{i}_input"
        if label in _SKIP_LABELS:
            continue
        if power.exists():
            rails.append(Rail(label, power, None, None))
        elif volt.exists() and curr.exists():
            rails.append(Rail(label, None, volt, curr))
    return rails


def _hwmon_rails(dev: Path, read_text: TextReader) -> list[Rail]:
    rails = []
    for curr in sorted(dev.glob("curr*_input")):
        c = re.fullmatch(r"curr(\d+)_input", curr.name)
        if not c:
            continue
        ch = c.group(1)
        enable = dev / f"in{ch}_enable"
        if enable.exists() and read_text(enable).strip() == "0":
            continue
        label_file, volt = dev / f"in{ch}_label", dev / f"in{ch}_input"
        label = read_text(label_file).strip() if label_file.exists() else f"channel{ch}"
        if label in _SKIP_LABELS or not volt.exists():
            continue
        rails.append(Rail(label, None, volt, curr))
    return rails


def discover_rails(roots: Sequence[str | Path], read_text: TextReader = default_read_text) -> list[Rail]:
    """INA3221 rails under the given roots (either layout). Raises PermissionError unchanged."""
    rails: list[Rail] = []
    seen: set[str] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        iio_devs = sorted(root.glob("*/iio:device*"))
        hwmon_devs = [
            d
            for d in sorted({*root.glob("hwmon*"), *root.glob("*/hwmon/hwmon*")})
            if (d / "name").exists() and read_text(d / "name").strip().startswith("ina3221")
        ]
        for dev in iio_devs:
            rails += _iio_rails(dev, read_text)
        for dev in hwmon_devs:
            rails += _hwmon_rails(dev, read_text)
    unique = []
    for r in rails:  # the same chip may be reachable from two roots
        key = str(r.power_file or r.curr_file)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def select_rails(rails: list[Rail]) -> list[Rail]:
    """The input rail if present (whole-board power), else every rail. Pure."""
    for name in TOTAL_RAILS:
        total = [r for r in rails if r.label == name]
        if total:
            return total[:1]
    return rails


class JetsonMeter(PollingMeter):
    """Board power from the INA3221 rails. Source ``jetson-ina3221:VDD_IN`` or ``...:sum(A+B)``."""

    measured = True

    def __init__(
        self,
        roots: Sequence[str | Path] = DEFAULT_ROOTS,
        interval_s: float = 0.1,
        *,
        read_text: TextReader = default_read_text,
        clock: Callable[[], float] | None = None,
    ):
        super().__init__(interval_s, **({"clock": clock} if clock else {}))
        self._read_text = read_text
        try:
            all_rails = discover_rails(roots, read_text)
        except PermissionError as exc:
            raise MeterUnavailable(
                f"permission denied reading {exc.filename}: grant read access with "
                f"'sudo chmod o+r {exc.filename}' or run the client in a group that can read it"
            ) from exc
        if not all_rails:
            raise MeterUnavailable(f"no INA3221 power rails under {', '.join(map(str, roots))} (not a Jetson?)")
        self.all_rails = all_rails
        self.rails = select_rails(all_rails)
        labels = [r.label for r in self.rails]
        self.source = "jetson-ina3221:" + (labels[0] if len(labels) == 1 else f"sum({'+'.join(labels)})")
        try:
            self._read_watts()
        except PermissionError as exc:
            raise MeterUnavailable(
                f"permission denied reading {exc.filename}: grant read access with 'sudo chmod o+r {exc.filename}'"
            ) from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"INA3221 rails unreadable: {exc}") from exc

    def _read_watts(self) -> float:
        return sum(r.watts(self._read_text) for r in self.rails)

    def _extra_detail(self) -> dict:
        return {"rails": [r.label for r in self.rails], "available_rails": [r.label for r in self.all_rails]}
