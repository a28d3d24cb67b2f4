"""Energy meters for edge clients: one interface (start/stop -> joules + source label).

See docs/energy.md. Imports nothing beyond the standard library; ``pynvml`` is optional and
imported only when the NVML meter is built.
"""

from .auto import BUILDERS, auto_meter, estimate_meter, make_meter, phase_meter
from .base import EnergyError, EnergyMeter, EnergyReading, MeterUnavailable
from .composite import SumMeter
from .config import METER_NAMES, EnergyConfig
from .estimate import (
    DEVICE_PROFILES,
    LINK_PROFILES,
    DeviceProfile,
    EstimateMeter,
    LinkProfile,
    compute_joules,
    detect_profile,
    radio_joules,
)
from .external import ExternalEnergyMeter, ExternalPowerMeter, external_meter
from .jetson import JetsonMeter
from .nvml import NvmlEnergyCounterMeter, NvmlPowerMeter, nvml_meter
from .phases import PHASES, PhaseHandle, PhaseMeter
from .rapl import RaplMeter, counter_delta, rapl_permission_hint
from .rpi import RpiPmicMeter, parse_pmic_adc
from .sampling import PollingMeter, trapezoid_joules

__all__ = [
    "BUILDERS", "DEVICE_PROFILES", "LINK_PROFILES", "METER_NAMES", "PHASES",
    "DeviceProfile", "EnergyConfig", "EnergyError", "EnergyMeter", "EnergyReading", "EstimateMeter",
    "ExternalEnergyMeter", "ExternalPowerMeter", "JetsonMeter", "LinkProfile", "MeterUnavailable",
    "NvmlEnergyCounterMeter", "NvmlPowerMeter", "PhaseHandle", "PhaseMeter", "PollingMeter",
    "RaplMeter", "RpiPmicMeter", "SumMeter",
    "auto_meter", "compute_joules", "counter_delta", "detect_profile", "estimate_meter",
    "external_meter", "make_meter", "nvml_meter", "parse_pmic_adc", "phase_meter", "radio_joules",
    "rapl_permission_hint", "trapezoid_joules",
]
