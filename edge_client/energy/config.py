"""Typed configuration of the energy meters (one dataclass, validated on construction)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .estimate import DEVICE_PROFILES, LINK_PROFILES, DeviceProfile, detect_profile
from .external import QUANTITIES

#: names accepted by ``--energy`` / EnergyConfig.meter / make_meter
METER_NAMES = ("auto", "rapl", "jetson", "nvml", "rpi", "external", "estimate")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class EnergyConfig:
    meter: str = _f("auto", f"energy meter: one of {', '.join(METER_NAMES)}; auto picks the best available")
    device: str = _f("cpu", "training device ('cpu', 'cuda', 'cuda:N'); cuda makes auto try NVML/Jetson first")
    interval_s: float = _f(0.1, "sampling interval of polling meters (Jetson, NVML power, external file), s")
    command_interval_s: float = _f(0.5, "sampling interval of meters that spawn a process (vcgencmd, external command), s")
    command_timeout_s: float = _f(5.0, "timeout of one vcgencmd / external command run, s")
    profile: str = _f("auto", f"estimate profile: auto or one of {', '.join(DEVICE_PROFILES)}")
    cpu_watts: float | None = _f(None, "estimate: W per fully busy core above idle (overrides the profile)")
    idle_watts: float | None = _f(None, "estimate: board idle W added for the wall time of a phase (overrides the profile)")
    gpu_watts: float | None = _f(None, "estimate: W while the GPU is busy (overrides the profile)")
    link: str = _f("wifi", f"radio profile for the estimate: {', '.join(LINK_PROFILES)}")
    external_cmd: str | None = _f(None, "external meter: command printing watts or a joule counter (no shell)")
    external_file: str | None = _f(None, "external meter: file whose last line ends with watts or a joule counter")
    external_quantity: str = _f("power_w", f"what the external meter prints: {', '.join(QUANTITIES)}")
    external_scale: float = _f(1.0, "multiplier to W or J (1e-3 for mW, 3600 for Wh)")
    rapl_root: str = _f("/sys/class/powercap", "powercap sysfs root")
    rapl_poll_s: float = _f(10.0, "RAPL counter read period (must beat the counter wraparound), s")
    jetson_roots: tuple[str, ...] = _f(
        ("/sys/bus/i2c/drivers/ina3221x", "/sys/class/hwmon"), "roots searched for INA3221 rails"
    )
    vcgencmd: str = _f("vcgencmd", "vcgencmd executable (looked up on PATH)")

    def __post_init__(self) -> None:
        if self.meter not in METER_NAMES:
            raise ValueError(f"meter: unknown {self.meter!r}; choose one of {', '.join(METER_NAMES)}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device.startswith("cuda:") and not self.device[5:].isdigit():
            raise ValueError(f"device: bad GPU index in {self.device!r}")
        for name in ("interval_s", "command_interval_s", "command_timeout_s", "rapl_poll_s", "external_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name}: must be a number > 0, got {v!r}")
        for name in ("cpu_watts", "idle_watts", "gpu_watts"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0):
                raise ValueError(f"{name}: must be a number >= 0 or None, got {v!r}")
        if self.profile != "auto" and self.profile not in DEVICE_PROFILES:
            raise ValueError(f"profile: unknown {self.profile!r}; choose auto or one of {', '.join(DEVICE_PROFILES)}")
        if self.link not in LINK_PROFILES:
            raise ValueError(f"link: unknown {self.link!r}; choose one of {', '.join(LINK_PROFILES)}")
        if self.external_quantity not in QUANTITIES:
            raise ValueError(f"external_quantity: must be one of {', '.join(QUANTITIES)}, got {self.external_quantity!r}")
        if self.external_cmd is not None and self.external_file is not None:
            raise ValueError("external_cmd: set either external_cmd or external_file, not both")
        if self.meter == "external" and self.external_cmd is None and self.external_file is None:
            raise ValueError("external_cmd: meter 'external' needs external_cmd or external_file")
        if isinstance(self.jetson_roots, str):
            self.jetson_roots = (self.jetson_roots,)
        self.jetson_roots = tuple(self.jetson_roots)

    @property
    def gpu_index(self) -> int:
        return int(self.device[5:]) if self.device.startswith("cuda:") else 0

    @property
    def uses_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def device_profile(self) -> DeviceProfile:
        """The estimate profile (auto-detected if 'auto') with the explicit watt overrides applied."""
        base = DEVICE_PROFILES[detect_profile() if self.profile == "auto" else self.profile]
        overrides = {k: getattr(self, k) for k in ("cpu_watts", "idle_watts", "gpu_watts") if getattr(self, k) is not None}
        return dataclasses.replace(base, **overrides) if overrides else base

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EnergyConfig":
        """From a TOML table; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown energy setting (known: {', '.join(sorted(known))})")
        kw = dict(data)
        if "jetson_roots" in kw and isinstance(kw["jetson_roots"], list):
            kw["jetson_roots"] = tuple(kw["jetson_roots"])
        return cls(**kw)
