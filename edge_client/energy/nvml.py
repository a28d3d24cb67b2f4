"""NVIDIA GPU energy through NVML (optional dependency ``nvidia-ml-py``, module ``pynvml``).

Volta and newer GPUs have a total-energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, milli-joules since driver load): we difference it
(source ``nvml:energy-counter``). Older GPUs only report instantaneous board power
(``nvmlDeviceGetPowerUsage``, milli-watts), which we poll and integrate (``nvml:power-poll``).
This is GPU board power only; :mod:`.auto` adds RAPL for the CPU when both are available.
Jetson boards have no NVML: they use :mod:`.jetson`. ``pynvml`` is imported lazily so the
package imports without it.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType
from typing import Any, Callable

from .base import EnergyError, EnergyMeter, EnergyReading, MeterUnavailable
from .sampling import PollingMeter

log = logging.getLogger(__name__)

INSTALL_HINT = "install the optional dependency: pip install 'fedpara-edge[nvml]' (package nvidia-ml-py)"


def load_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise MeterUnavailable(f"pynvml not importable ({exc}); {INSTALL_HINT}") from exc


def _errors(nv: ModuleType) -> tuple[type[BaseException], ...]:
    err = getattr(nv, "NVMLError", None)
    return (err, OSError) if isinstance(err, type) else (OSError,)


class _NvmlHandle:
    """nvmlInit + device handle; nvmlShutdown on close (NVML reference-counts init)."""

    def __init__(self, index: int, module: ModuleType | None):
        self.nv = module if module is not None else load_pynvml()
        self.errors = _errors(self.nv)
        try:
            self.nv.nvmlInit()
        except self.errors as exc:
            raise MeterUnavailable(f"NVML init failed (no NVIDIA driver/GPU?): {exc}") from exc
        self._open = True
        try:
            self.handle = self.nv.nvmlDeviceGetHandleByIndex(index)
        except self.errors as exc:
            self.close()
            raise MeterUnavailable(f"NVML has no GPU {index}: {exc}") from exc
        try:
            name = self.nv.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except (*self.errors, AttributeError):
            self.name = f"gpu{index}"

    def call(self, fn: str) -> Any:
        return getattr(self.nv, fn)(self.handle)

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self.nv.nvmlShutdown()
            except self.errors as exc:
                log.debug("nvmlShutdown: %s", exc)


class NvmlEnergyCounterMeter(EnergyMeter):
    """Differences the GPU's total-energy counter (mJ). Source ``nvml:energy-counter``."""

    source = "nvml:energy-counter"
    measured = True

    def __init__(self, nvml: _NvmlHandle, *, clock: Callable[[], float] = time.monotonic):
        self._nvml = nvml
        self._clock = clock
        self._start: tuple[float, int] | None = None

    def _read_mj(self) -> int:
        try:
            return int(self._nvml.call("nvmlDeviceGetTotalEnergyConsumption"))
        except self._nvml.errors as exc:
            raise EnergyError(f"{self.source}: {exc}") from exc

    def start(self) -> None:
        self._start = (self._clock(), self._read_mj())

    def stop(self) -> EnergyReading:
        if self._start is None:
            raise RuntimeError(f"{self!r} stopped without start()")
        t0, e0 = self._start
        self._start = None
        e1 = self._read_mj()
        detail = {"gpu": self._nvml.name}
        if e1 < e0:  # counter reset (driver reload): report what we can
            log.warning("%s: counter went backwards (%d -> %d mJ)", self.source, e0, e1)
            detail["counter_reset"] = True
            e0 = 0
        return EnergyReading((e1 - e0) / 1e3, self._clock() - t0, self.source, True, detail)

    def close(self) -> None:
        self._nvml.close()


class NvmlPowerMeter(PollingMeter):
    """Polls GPU board power (mW) and integrates. Source ``nvml:power-poll``."""

    source = "nvml:power-poll"
    measured = True

    def __init__(self, nvml: _NvmlHandle, interval_s: float = 0.1):
        super().__init__(interval_s)
        self._nvml = nvml

    def _read_watts(self) -> float:
        try:
            return float(self._nvml.call("nvmlDeviceGetPowerUsage")) / 1e3
        except self._nvml.errors as exc:
            raise EnergyError(str(exc)) from exc

    def _extra_detail(self) -> dict:
        return {"gpu": self._nvml.name}

    def close(self) -> None:
        super().close()
        self._nvml.close()


def nvml_meter(index: int = 0, interval_s: float = 0.1, *, module: ModuleType | None = None) -> EnergyMeter:
    """The energy-counter meter where the GPU has one, else the power-polling meter."""
    nvml = _NvmlHandle(index, module)
    try:
        nvml.call("nvmlDeviceGetTotalEnergyConsumption")
        return NvmlEnergyCounterMeter(nvml)
    except nvml.errors as exc:
        log.info("NVML energy counter unsupported on %s (%s); polling power", nvml.name, exc)
    try:
        nvml.call("nvmlDeviceGetPowerUsage")
    except nvml.errors as exc:
        nvml.close()
        raise MeterUnavailable(f"NVML reports neither energy nor power for {nvml.name}: {exc}") from exc
    return NvmlPowerMeter(nvml, interval_s)
