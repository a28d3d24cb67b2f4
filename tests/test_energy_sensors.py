"""Jetson INA3221, Raspberry Pi 5 PMIC (fake vcgencmd on PATH), NVML (fake pynvml), external meters."""

from __future__ import annotations

import os
import stat
import sys
import types
from pathlib import Path

import pytest
from support import wait_until

from edge_client.energy import (
    EnergyError,
    ExternalEnergyMeter,
    JetsonMeter,
    MeterUnavailable,
    NvmlEnergyCounterMeter,
    NvmlPowerMeter,
    PollingMeter,
    RpiPmicMeter,
    external_meter,
    nvml_meter,
    parse_pmic_adc,
    trapezoid_joules,
)
from edge_client.energy.base import default_read_text

FAST = 0.01  # polling interval in tests


def w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# -- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "want"),
    [([], 0.0), ([(0.0, 5.0)], 0.0), ([(0.0, 2.0), (1.0, 4.0)], 3.0), ([(0, 1), (1, 1), (3, 3)], 5.0)],
)
def test_trapezoid(samples: list, want: float) -> None:
    assert trapezoid_joules(samples) == pytest.approx(want)


class ScriptedMeter(PollingMeter):
    source = "scripted"

    def __init__(self, watts: list[float], times: list[float]) -> None:
        super().__init__(interval_s=3600, clock=iter(times).__next__)
        self._watts = iter(watts)

    def _read_watts(self) -> float:
        return next(self._watts)


def test_polling_meter_trapezoid_and_edges() -> None:
    # start() at t=0, first sample read at t=1 (2 W), final sample at t=3 (4 W), stop() at t=4
    m = ScriptedMeter([2.0, 4.0], [0, 1, 1, 3, 3, 4])
    m.start()
    r = m.stop()
    assert r.seconds == 4 and r.detail["samples"] == 2
    assert r.joules == pytest.approx(2.0 * 1 + 0.5 * (2 + 4) * 2 + 4.0 * 1)


def test_polling_meter_rejects_implausible_first_sample() -> None:
    with pytest.raises(EnergyError, match="implausible"):
        ScriptedMeter([-1.0], [0, 1, 1]).start()


# -- Jetson ------------------------------------------------------------------------------------


def iio_tree(root: Path, rails: dict[str, tuple[int, int, int]], with_power: bool = True) -> Path:
    """L4T r32 layout: rails {name: (mW, mA, mV)}."""
    dev = root / "1-0040" / "iio:device0"
    for i, (name, (mw, ma, mv)) in enumerate(rails.items()):
        w(dev / f"rail_name_{i}", name)
        if with_power:
            w(dev / f"in_power{i}_input", str(mw))
        w(dev / f"in_current{i}_input", str(ma))
        w(dev / f"in_voltage{i}_input", str(mv))
    return dev


def hwmon_tree(root: Path, rails: dict[str, tuple[int, int]], hw: str = "hwmon3") -> Path:
    """L4T r34+ layout: rails {label: (mV, mA)}, plus shunt/sum channels and an unrelated hwmon."""
    w(root / "hwmon0" / "name", "acpitz")
    w(root / "hwmon0" / "temp1_input", "45000")
    dev = root / hw
    w(dev / "name", "ina3221")
    for ch, (label, (mv, ma)) in enumerate(rails.items(), start=1):
        w(dev / f"in{ch}_label", label)
        w(dev / f"in{ch}_input", str(mv))
        w(dev / f"curr{ch}_input", str(ma))
        w(dev / f"in{ch}_enable", "1")
        w(dev / f"in{ch + 3}_input", "12")  # shunt voltage channel, no current
    w(dev / "in7_label", "sum of shunt voltages")
    w(dev / "in7_input", "40")
    return dev


def test_jetson_iio_uses_vdd_in(tmp_path: Path) -> None:
    iio_tree(tmp_path / "ina3221x", {"VDD_IN": (5000, 1000, 5000), "VDD_SYS_GPU": (1500, 300, 5000)})
    m = JetsonMeter([tmp_path / "ina3221x", tmp_path / "nohwmon"], FAST)
    assert m.source == "jetson-ina3221:VDD_IN"
    assert m._read_watts() == pytest.approx(5.0)
    m.start()
    wait_until(lambda: m.reads >= 3, what="three reads of the meter")
    r = m.stop()
    assert r.measured and r.detail["samples"] >= 3 and r.detail["sample_errors"] == 0
    assert r.joules == pytest.approx(5.0 * r.seconds, rel=1e-6)
    assert r.detail["available_rails"] == ["VDD_IN", "VDD_SYS_GPU"]


def test_jetson_iio_without_power_files_uses_v_times_i(tmp_path: Path) -> None:
    iio_tree(tmp_path / "x", {"POM_5V_IN": (0, 800, 5000), "POM_5V_GPU": (0, 100, 5000)}, with_power=False)
    m = JetsonMeter([tmp_path / "x"], FAST)
    assert m.source == "jetson-ina3221:POM_5V_IN"
    assert m._read_watts() == pytest.approx(4.0)


def test_jetson_hwmon_v_times_i(tmp_path: Path) -> None:
    hwmon_tree(tmp_path / "hwmon", {"VDD_IN": (5072, 1480), "VDD_CPU_GPU_CV": (5072, 400), "VDD_SOC": (5072, 300)})
    m = JetsonMeter([tmp_path / "absent", tmp_path / "hwmon"], FAST)
    assert m.source == "jetson-ina3221:VDD_IN"
    assert m._read_watts() == pytest.approx(5.072 * 1.480)


def test_jetson_sum_when_no_input_rail_and_disabled_channel_skipped(tmp_path: Path) -> None:
    dev = hwmon_tree(tmp_path / "hwmon", {"VDD_GPU_SOC": (5000, 1000), "VDD_CPU_CV": (5000, 500), "NC": (0, 0)})
    w(dev / "in2_enable", "0")
    m = JetsonMeter([tmp_path / "hwmon"], FAST)
    assert m.source == "jetson-ina3221:VDD_GPU_SOC"
    w(dev / "in2_enable", "1")
    m = JetsonMeter([tmp_path / "hwmon"], FAST)
    assert m.source == "jetson-ina3221:sum(VDD_GPU_SOC+VDD_CPU_CV)"
    assert m._read_watts() == pytest.approx(7.5)


def test_jetson_missing_and_permission(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="no INA3221"):
        JetsonMeter([tmp_path / "nothing"], FAST)
    hwmon_tree(tmp_path / "hwmon", {"VDD_IN": (5000, 1000)})

    def deny(path: Path) -> str:
        if path.name.startswith("curr"):
            raise PermissionError(13, "Permission denied", str(path))
        return default_read_text(path)

    with pytest.raises(MeterUnavailable, match="chmod o\\+r"):
        JetsonMeter([tmp_path / "hwmon"], FAST, read_text=deny)


def test_jetson_sensor_vanishing_mid_phase_never_crashes(tmp_path: Path) -> None:
    dev = hwmon_tree(tmp_path / "hwmon", {"VDD_IN": (5000, 1000)})
    m = JetsonMeter([tmp_path / "hwmon"], FAST)
    m.start()
    (dev / "curr1_input").unlink()
    wait_until(lambda: m.reads >= 3, what="three reads of the meter")
    r = m.stop()
    assert r.detail["sample_errors"] >= 1
    assert r.joules == pytest.approx(5.0 * r.seconds, rel=1e-6)  # constant-power from the start sample


# -- Raspberry Pi 5 PMIC -------------------------------------------------------------------------

PMIC_OUTPUT = """\
 3V7_WL_SW_A current(0)=0.00000000A
   3V3_SYS_A current(1)=0.05172390A
   1V8_SYS_A current(2)=0.18521800A
  DDR_VDD2_A current(3)=0.02049720A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.18642010A
   0V8_SYS_A current(6)=0.33498470A
  VDD_CORE_A current(7)=2.51620000A
   3V3_DAC_A current(17)=0.00012210A
   3V3_ADC_A current(18)=0.00000000A
   0V8_AON_A current(16)=0.00048840A
      HDMI_A current(22)=0.00000000A
 3V7_WL_SW_V volt(8)=3.59597600V
   3V3_SYS_V volt(9)=3.30146800V
   1V8_SYS_V volt(10)=1.80060800V
  DDR_VDD2_V volt(11)=1.11355000V
  DDR_VDDQ_V volt(12)=0.60158730V
   1V1_SYS_V volt(13)=1.10622000V
   0V8_SYS_V volt(14)=0.80000000V
  VDD_CORE_V volt(15)=0.76242820V
   3V3_DAC_V volt(20)=3.30329900V
   3V3_ADC_V volt(21)=3.30146800V
   0V8_AON_V volt(19)=0.79926740V
      HDMI_V volt(23)=5.14993000V
     EXT5V_V volt(24)=5.14993000V
      BATT_V volt(25)=0.00000000V
"""
PMIC_WATTS = (
    0.05172390 * 3.30146800 + 0.18521800 * 1.80060800 + 0.02049720 * 1.11355000
    + 0.18642010 * 1.10622000 + 0.33498470 * 0.80000000 + 2.51620000 * 0.76242820
    + 0.00012210 * 3.30329900 + 0.00048840 * 0.79926740
)


def test_parse_pmic_adc() -> None:
    rails = parse_pmic_adc(PMIC_OUTPUT)
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails
    assert rails["VDD_CORE"] == pytest.approx(2.51620000 * 0.76242820)
    assert sum(rails.values()) == pytest.approx(PMIC_WATTS)
    assert parse_pmic_adc("VDD_CORE_A=2.0A\nVDD_CORE_V=0.5V\n") == {"VDD_CORE": pytest.approx(1.0)}
    assert parse_pmic_adc("error=2 error_msg=\"Command not registered\"\n") == {}


def fake_vcgencmd(bindir: Path, body: str) -> Path:
    bindir.mkdir(exist_ok=True)
    exe = bindir / "vcgencmd"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


@pytest.fixture
def pmic_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "pmic.txt"
    out.write_text(PMIC_OUTPUT)
    bindir = tmp_path / "bin"
    fake_vcgencmd(bindir, f'[ "$1" = pmic_read_adc ] || exit 1\nexec cat "{out}"')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return out


def test_rpi_pmic_meter_through_fake_vcgencmd(pmic_path: Path) -> None:
    m = RpiPmicMeter(interval_s=FAST)
    assert m.source == "rpi5-pmic" and len(m.rail_names) == 12
    assert m._read_watts() == pytest.approx(PMIC_WATTS)
    m.start()
    wait_until(lambda: m.reads >= 3, what="three reads of the meter")
    r = m.stop()
    assert r.measured and r.detail["samples"] >= 3 and r.detail["sample_errors"] == 0
    assert r.joules == pytest.approx(PMIC_WATTS * r.seconds, rel=1e-6)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('echo "VCHI initialization failed" >&2; exit 255', "usermod -aG video"),
        ('echo \'error=2 error_msg="Command not registered"\'', "not a Pi 5"),
    ],
)
def test_rpi_failures_are_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, match: str) -> None:
    fake_vcgencmd(tmp_path / "bin", body)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(MeterUnavailable, match=match):
        RpiPmicMeter(interval_s=FAST)


def test_rpi_missing_vcgencmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MeterUnavailable, match="not found on PATH"):
        RpiPmicMeter()


# -- NVML ----------------------------------------------------------------------------------------


def fake_pynvml(*, energy: bool = True, power: bool = True, init_ok: bool = True) -> types.ModuleType:
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"mj": 1_000_000, "inits": 0}

    def init() -> None:
        if not init_ok:
            raise NVMLError("Driver Not Loaded")
        state["inits"] += 1

    def shutdown() -> None:
        state["inits"] -= 1

    def total_energy(h: object) -> int:
        if not energy:
            raise NVMLError("Not Supported")
        return state["mj"]

    def power_usage(h: object) -> int:
        if not power:
            raise NVMLError("Not Supported")
        return 75_000  # mW

    nv.NVMLError = NVMLError
    nv.nvmlInit, nv.nvmlShutdown = init, shutdown
    nv.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nv.nvmlDeviceGetName = lambda h: b"Fake GPU"
    nv.nvmlDeviceGetTotalEnergyConsumption = total_energy
    nv.nvmlDeviceGetPowerUsage = power_usage
    nv.state = state
    return nv


def test_nvml_energy_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    m = nvml_meter(0, FAST)
    assert isinstance(m, NvmlEnergyCounterMeter) and m.source == "nvml:energy-counter"
    m.start()
    nv.state["mj"] += 12_345
    r = m.stop()
    assert r.joules == pytest.approx(12.345) and r.detail["gpu"] == "Fake GPU"
    m.close()
    assert nv.state["inits"] == 0


def test_nvml_power_poll_when_no_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energy=False))
    m = nvml_meter(0, FAST)
    assert isinstance(m, NvmlPowerMeter) and m.source == "nvml:power-poll"
    m.start()
    wait_until(lambda: m.reads >= 3, what="three reads of the meter")
    r = m.stop()
    assert r.joules == pytest.approx(75.0 * r.seconds, rel=1e-6)
    m.close()


@pytest.mark.parametrize(
    ("module", "match"),
    [(None, "nvidia-ml-py"), ("noinit", "init failed"), ("nothing", "neither energy nor power")],
)
def test_nvml_unavailable(monkeypatch: pytest.MonkeyPatch, module: str | None, match: str) -> None:
    mod = {None: None, "noinit": fake_pynvml(init_ok=False), "nothing": fake_pynvml(energy=False, power=False)}
    monkeypatch.setitem(sys.modules, "pynvml", mod[module])  # None makes the import fail
    with pytest.raises(MeterUnavailable, match=match):
        nvml_meter()


# -- external ------------------------------------------------------------------------------------


def test_external_command_power(tmp_path: Path) -> None:
    script = fake_vcgencmd(tmp_path / "bin", "echo 'power: 12.5'")
    m = external_meter(command=f"{script} --watts", interval_s=FAST)
    assert m.source == "external-cmd"
    m.start()
    wait_until(lambda: m.reads >= 3, what="three reads of the meter")
    r = m.stop()
    assert r.joules == pytest.approx(12.5 * r.seconds, rel=1e-6)


def test_external_file_power_log_with_timestamps_and_scale(tmp_path: Path) -> None:
    log = tmp_path / "usb-meter.csv"
    log.write_text("time,mW\n1718000000.0,4000\n1718000000.5,6000\n")
    m = external_meter(path=log, interval_s=FAST, scale=1e-3)
    assert m.source == "external-file"
    assert m._read_watts() == pytest.approx(6.0)


def test_external_file_energy_counter(tmp_path: Path) -> None:
    f = tmp_path / "plug_wh"
    f.write_text("10.0\n")
    m = external_meter(path=f, quantity="energy_j", scale=3600.0)
    assert isinstance(m, ExternalEnergyMeter)
    m.start()
    f.write_text("10.5\n")
    assert m.stop().joules == pytest.approx(1800.0)
    m.start()
    f.write_text("0.1\n")  # the plug was reset
    r = m.stop()
    assert r.joules == 0.0 and r.detail["counter_reset"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"path": "/nonexistent/energy"}, "not found"),
        ({"command": "/nonexistent/meter"}, "not found"),
        ({}, "exactly one"),
        ({"command": "false"}, "exited 1"),
    ],
)
def test_external_unavailable(kw: dict, match: str) -> None:
    with pytest.raises(MeterUnavailable, match=match):
        external_meter(**kw)


def test_external_garbage_mid_phase(tmp_path: Path) -> None:
    f = tmp_path / "watts"
    f.write_text("3.0\n")
    m = external_meter(path=f, quantity="energy_j")
    m.start()
    f.write_text("n/a\n")
    with pytest.raises(EnergyError):
        m.stop()
