"""Choosing a meter: ``make_meter(name)`` for an explicit choice, ``auto_meter(config)`` for the best
available one (never raises), ``phase_meter(config)`` for the per-round helper the client uses.

Auto order (first that builds and reads wins; each refusal is logged with its reason):

1. ``external`` when ``external_cmd``/``external_file`` is configured (an explicit wall/USB meter
   sees the whole device);
2. on CUDA: ``nvml`` (plus ``rapl`` for the CPU when readable, summed), then ``jetson``;
3. ``jetson`` (INA3221 VDD_IN), ``rpi`` (Pi 5 PMIC), ``rapl`` (Intel/AMD package + DRAM);
4. ``estimate`` (always works).

An explicit ``meter`` other than auto is tried alone, then the estimate.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from .base import EnergyMeter, MeterUnavailable
from .composite import SumMeter
from .config import METER_NAMES, EnergyConfig
from .estimate import LINK_PROFILES, EstimateMeter
from .external import external_meter
from .jetson import JetsonMeter
from .nvml import nvml_meter
from .phases import PhaseMeter
from .rapl import RaplMeter
from .rpi import RpiPmicMeter

log = logging.getLogger(__name__)


def _external(c: EnergyConfig) -> EnergyMeter:
    if c.external_cmd is None and c.external_file is None:
        raise MeterUnavailable("no external_cmd or external_file configured")
    return external_meter(
        command=c.external_cmd,
        path=c.external_file,
        quantity=c.external_quantity,
        interval_s=c.command_interval_s if c.external_cmd is not None else c.interval_s,
        scale=c.external_scale,
        timeout_s=c.command_timeout_s,
    )


def estimate_meter(c: EnergyConfig) -> EstimateMeter:
    return EstimateMeter(c.device_profile(), LINK_PROFILES[c.link])


BUILDERS: dict[str, Callable[[EnergyConfig], EnergyMeter]] = {
    "rapl": lambda c: RaplMeter(c.rapl_root, poll_s=c.rapl_poll_s),
    "jetson": lambda c: JetsonMeter(c.jetson_roots, c.interval_s),
    "nvml": lambda c: nvml_meter(c.gpu_index, c.interval_s),
    "rpi": lambda c: RpiPmicMeter(c.vcgencmd, c.command_interval_s, timeout_s=c.command_timeout_s),
    "external": _external,
    "estimate": estimate_meter,
}


def _config(config: EnergyConfig | None, overrides: dict[str, Any]) -> EnergyConfig:
    config = config if config is not None else EnergyConfig()
    return dataclasses.replace(config, **overrides) if overrides else config


def make_meter(name: str, config: EnergyConfig | None = None, **overrides: Any) -> EnergyMeter:
    """Build the named meter. ValueError for an unknown name; MeterUnavailable if it cannot work here.

    ``overrides`` are EnergyConfig fields (``rapl_root=...``, ``interval_s=...``).
    """
    if name not in METER_NAMES:
        raise ValueError(f"unknown energy meter {name!r}; choose one of {', '.join(METER_NAMES)}")
    cfg = _config(config, overrides)
    if name == "auto":
        return auto_meter(dataclasses.replace(cfg, meter="auto"))[0]
    return BUILDERS[name](cfg)


def _order(cfg: EnergyConfig) -> list[str]:
    if cfg.meter != "auto":
        order = [cfg.meter, "estimate"]
    else:
        order = []
        if cfg.external_cmd is not None or cfg.external_file is not None:
            order.append("external")
        if cfg.uses_cuda:
            order += ["nvml", "jetson"]
        order += ["jetson", "rpi", "rapl", "estimate"]
    return list(dict.fromkeys(order))


def auto_meter(config: EnergyConfig | None = None, **overrides: Any) -> tuple[EnergyMeter, str]:
    """(meter, reason): the first meter of the order above that works. Never raises."""
    cfg = _config(config, overrides)
    skipped: list[str] = []
    for name in _order(cfg):
        try:
            meter = BUILDERS[name](cfg)
        except MeterUnavailable as exc:
            level = logging.WARNING if "permission" in str(exc).lower() else logging.INFO
            log.log(level, "energy meter %s unavailable: %s", name, exc)
            skipped.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # a bug or an odd device must not stop the client
            log.warning("energy meter %s failed unexpectedly: %r", name, exc, exc_info=True)
            skipped.append(f"{name}: unexpected {exc!r}")
            continue
        if name == "nvml" and cfg.meter == "auto":
            try:  # GPU board power misses the CPU: add RAPL where readable
                meter = SumMeter([meter, BUILDERS["rapl"](cfg)])
            except MeterUnavailable as exc:
                log.info("nvml without rapl: %s", exc)
                skipped.append(f"rapl (with nvml): {exc}")
        reason = f"energy: using {meter.source}"
        if skipped:
            reason += " (skipped " + "; ".join(skipped) + ")"
        log.info("%s", reason)
        return meter, reason
    raise AssertionError("unreachable: the estimate always builds")  # pragma: no cover


def phase_meter(config: EnergyConfig | None = None, **overrides: Any) -> PhaseMeter:
    """The per-round helper: auto/explicit meter + the configured estimate as cross-check/fallback."""
    cfg = _config(config, overrides)
    meter, reason = auto_meter(cfg)
    estimate = meter if isinstance(meter, EstimateMeter) else estimate_meter(cfg)
    return PhaseMeter(meter, estimate, reason=reason)
