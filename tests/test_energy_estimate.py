"""Estimate maths, config validation, the phase helper, make_meter/auto_meter fallbacks."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edge_client.energy import (
    BUILDERS,
    DEVICE_PROFILES,
    LINK_PROFILES,
    DeviceProfile,
    EnergyConfig,
    EnergyError,
    EnergyMeter,
    EnergyReading,
    EstimateMeter,
    PhaseMeter,
    RaplMeter,
    SumMeter,
    auto_meter,
    compute_joules,
    detect_profile,
    make_meter,
    phase_meter,
    radio_joules,
)
from edge_client.energy.base import default_read_text

PROFILE = DeviceProfile(cpu_watts=2.0, idle_watts=3.0, gpu_watts=10.0, note="test")


def clock(*values: float):
    it = iter(values)
    return lambda: next(it)


# -- estimate maths ------------------------------------------------------------------------------


def test_compute_joules() -> None:
    assert compute_joules(4.0, 10.0, PROFILE) == pytest.approx(4 * 2 + 10 * 3)
    assert compute_joules(4.0, 10.0, PROFILE, gpu_seconds=1.5) == pytest.approx(8 + 30 + 15)


@pytest.mark.parametrize(
    ("link", "up", "down", "want"),
    [
        ("wifi", 10**6, 0, 10**6 * 283.17 * 8e-9),
        ("wifi", 0, 10**6, 10**6 * 137.01 * 8e-9),
        ("lte", 10**6, 2 * 10**6, 10**6 * 438.39 * 8e-9 + 2 * 10**6 * 51.97 * 8e-9 + 11.576 * 1.06),
        ("lte", 0, 0, 0.0),
        ("ethernet", 10**9, 10**9, 2 * 10**9 * 4e-9),
    ],
)
def test_radio_joules(link: str, up: int, down: int, want: float) -> None:
    assert radio_joules(up, down, LINK_PROFILES[link]) == pytest.approx(want)


def test_radio_joules_rejects_negative() -> None:
    with pytest.raises(ValueError):
        radio_joules(-1, 0, LINK_PROFILES["wifi"])


def test_estimate_meter_uses_process_cpu_time() -> None:
    m = EstimateMeter(PROFILE, cpu_clock=clock(1.0, 3.5), clock=clock(100.0, 110.0), gpu_clock=clock(0.0, 2.0))
    m.start()
    r = m.stop()
    assert not r.measured and r.source == "estimate" and r.seconds == pytest.approx(10.0)
    assert r.joules == pytest.approx(2.5 * 2.0 + 2.0 * 10.0 + 10.0 * 3.0)
    assert r.detail["cpu_j"] == pytest.approx(5.0) and r.detail["idle_j"] == pytest.approx(30.0)


def test_estimate_meter_real_clock_counts_busy_cpu() -> None:
    m = EstimateMeter(DeviceProfile(1.0, 0.0, 0.0, ""))
    m.start()
    x = sum(i * i for i in range(300_000))
    r = m.stop()
    assert x > 0 and r.joules == pytest.approx(r.detail["cpu_s"]) and r.detail["cpu_s"] > 0


def test_detect_profile(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert detect_profile(model, tmp_path / "none") == "rpi5"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert detect_profile(model, tmp_path / "none") == "rpi4"
    (tmp_path / "nv_tegra_release").write_text("# R35 (release)\n")
    assert detect_profile(tmp_path / "none", tmp_path / "nv_tegra_release") == "jetson"
    assert detect_profile(tmp_path / "none", tmp_path / "none") == "laptop"


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"meter": "wattmeter"}, "meter"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"interval_s": 0}, "interval_s"),
        ({"rapl_poll_s": -1}, "rapl_poll_s"),
        ({"cpu_watts": -2.0}, "cpu_watts"),
        ({"idle_watts": "3"}, "idle_watts"),
        ({"profile": "pi3"}, "profile"),
        ({"link": "5g"}, "link"),
        ({"external_quantity": "amps"}, "external_quantity"),
        ({"external_cmd": "x", "external_file": "y"}, "external_cmd"),
        ({"meter": "external"}, "external_cmd"),
    ],
)
def test_config_validation_names_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        EnergyConfig(**kw)


def test_config_profile_overrides_and_from_dict() -> None:
    cfg = EnergyConfig.from_dict({"profile": "rpi4", "idle_watts": 1.5, "device": "cuda:1", "jetson_roots": ["/a"]})
    p = cfg.device_profile()
    assert p.idle_watts == 1.5 and p.cpu_watts == DEVICE_PROFILES["rpi4"].cpu_watts
    assert cfg.gpu_index == 1 and cfg.uses_cuda and cfg.jetson_roots == ("/a",)
    with pytest.raises(ValueError, match="^colour:"):
        EnergyConfig.from_dict({"colour": "red"})


# -- phase helper --------------------------------------------------------------------------------


class FakeMeter(EnergyMeter):
    """Returns scripted joules; can fail on start or stop."""

    measured = True

    def __init__(self, joules: list[float], fail: str = "") -> None:
        self.source = "fake:sensor"
        self._j = iter(joules)
        self.fail = fail
        self.running = False

    def start(self) -> None:
        if self.fail == "start":
            raise EnergyError("sensor gone")
        self.running = True

    def stop(self) -> EnergyReading:
        self.running = False
        if self.fail == "stop":
            raise EnergyError("sensor gone")
        return EnergyReading(next(self._j), 1.0, self.source, True, {"k": 1})


def fixed_estimate() -> EstimateMeter:
    # every start/stop pair: 1 s CPU, 2 s wall -> 1*2 + 2*3 = 8 J
    return EstimateMeter(PROFILE, cpu_clock=itertools.count(0.0, 1.0).__next__, clock=itertools.count(0.0, 2.0).__next__)


def test_phase_meter_round_report() -> None:
    pm = PhaseMeter(FakeMeter([1.0, 20.0, 3.0]), fixed_estimate(), reason="r")
    with pm.phase("download") as ph:
        ph.bytes_received = 1000
    with pm.phase("train"):
        pass
    with pm.phase("upload", bytes_sent=2000):
        pass
    rep = pm.pop_report()
    assert set(rep) == {"download", "train", "upload", "total_j", "source", "measured"}
    assert rep["total_j"] == pytest.approx(24.0) and rep["source"] == "fake:sensor" and rep["measured"]
    up = rep["upload"]
    assert up["joules"] == 3.0 and up["source"] == "fake:sensor" and up["measured"] and up["bytes_sent"] == 2000
    wifi = LINK_PROFILES["wifi"]
    assert up["radio_j"] == pytest.approx(2000 * wifi.j_per_byte_up)
    assert up["estimate_j"] == pytest.approx(8.0 + up["radio_j"])
    assert rep["download"]["bytes_received"] == 1000
    json.dumps(rep)  # goes into metrics.jsonl
    assert pm.report()["total_j"] == 0 and not pm.report()["measured"]  # reset


def test_estimate_as_meter_includes_radio_and_reported_gpu() -> None:
    est = fixed_estimate()
    pm = PhaseMeter(est)
    with pm.phase("train", gpu_seconds=0.5):
        pass
    with pm.phase("upload") as ph:
        ph.bytes_sent = 10**6
    rep = pm.pop_report()
    assert rep["train"]["joules"] == pytest.approx(8.0 + 5.0) and not rep["measured"]
    assert rep["upload"]["joules"] == pytest.approx(8.0 + 10**6 * LINK_PROFILES["wifi"].j_per_byte_up)
    assert rep["upload"]["source"] == "estimate"


@pytest.mark.parametrize("fail", ["start", "stop"])
def test_phase_falls_back_to_estimate_on_sensor_failure(fail: str, caplog: pytest.LogCaptureFixture) -> None:
    pm = PhaseMeter(FakeMeter([], fail=fail), fixed_estimate())
    with pm.phase("train"):
        pass
    rep = pm.pop_report()
    t = rep["train"]
    assert t["source"] == "estimate" and not t["measured"] and t["joules"] == pytest.approx(8.0)
    assert "sensor gone" in t["fallback"] and not rep["measured"]
    assert "using the estimate" in caplog.text


def test_phase_stops_meter_when_body_raises_and_repeats_add_up() -> None:
    meter = FakeMeter([2.0, 5.0])
    pm = PhaseMeter(meter, fixed_estimate())
    with pytest.raises(KeyError):
        with pm.phase("upload", bytes_sent=10):
            raise KeyError("broker gone")
    assert not meter.running
    with pm.phase("upload", bytes_sent=5):
        pass
    up = pm.report()["upload"]
    assert up["joules"] == 7.0 and up["bytes_sent"] == 15 and up["seconds"] == 2.0
    with pytest.raises(RuntimeError, match="inside phase"):
        with pm.phase("train"):
            with pm.phase("upload"):
                pass


# -- make_meter / auto_meter ---------------------------------------------------------------------


def isolated(tmp_path: Path, **kw) -> EnergyConfig:
    """A config that sees only what the test builds under tmp_path."""
    base = dict(
        rapl_root=str(tmp_path / "powercap"),
        jetson_roots=(str(tmp_path / "ina3221x"), str(tmp_path / "hwmon")),
        vcgencmd=str(tmp_path / "bin" / "vcgencmd"),
        profile="laptop",
    )
    base.update(kw)
    return EnergyConfig(**base)


def rapl_tree(tmp_path: Path) -> None:
    d = tmp_path / "powercap" / "intel-rapl:0"
    d.mkdir(parents=True)
    (d / "name").write_text("package-0\n")
    (d / "energy_uj").write_text("5\n")
    (d / "max_energy_range_uj").write_text("262143328850\n")


def test_make_meter_unknown_name() -> None:
    with pytest.raises(ValueError, match="'joulemeter'"):
        make_meter("joulemeter")


def test_make_meter_explicit(tmp_path: Path) -> None:
    rapl_tree(tmp_path)
    m = make_meter("rapl", isolated(tmp_path))
    assert isinstance(m, RaplMeter)
    assert make_meter("estimate", profile="rpi5").source == "estimate"


def test_auto_falls_back_to_estimate_when_nothing_is_there(tmp_path: Path) -> None:
    meter, reason = auto_meter(isolated(tmp_path))
    assert meter.source == "estimate" and not meter.measured
    assert "jetson:" in reason and "rpi:" in reason and "rapl:" in reason


def test_auto_picks_rapl(tmp_path: Path) -> None:
    rapl_tree(tmp_path)
    meter, reason = auto_meter(isolated(tmp_path))
    assert meter.source == "rapl:package-0" and reason.startswith("energy: using rapl:package-0")


def test_auto_permission_error_logs_hint_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rapl_tree(tmp_path)

    def deny(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return default_read_text(path)

    monkeypatch.setitem(BUILDERS, "rapl", lambda c: RaplMeter(c.rapl_root, read_text=deny))
    meter, reason = auto_meter(isolated(tmp_path))
    assert meter.source == "estimate"
    assert "sudo chmod o+r" in reason and "sudo chmod o+r" in caplog.text


def test_auto_never_raises_on_unexpected_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(c: EnergyConfig) -> EnergyMeter:
        raise ZeroDivisionError("driver bug")

    monkeypatch.setitem(BUILDERS, "jetson", boom)
    meter, reason = auto_meter(isolated(tmp_path, meter="jetson"))
    assert meter.source == "estimate" and "driver bug" in reason


def test_auto_cuda_sums_nvml_and_rapl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rapl_tree(tmp_path)
    nv = types.ModuleType("pynvml")
    nv.NVMLError = type("NVMLError", (Exception,), {})
    nv.nvmlInit = nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetName = lambda h: "Fake GPU"
    nv.nvmlDeviceGetTotalEnergyConsumption = lambda h: 42
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    meter, _ = auto_meter(isolated(tmp_path, device="cuda"))
    assert isinstance(meter, SumMeter) and meter.source == "nvml:energy-counter+rapl:package-0"
    meter.start()
    r = meter.stop()
    assert r.joules == 0.0 and set(r.detail) == {"nvml:energy-counter", "rapl:package-0"}
    meter.close()


def test_auto_prefers_configured_external(tmp_path: Path) -> None:
    rapl_tree(tmp_path)
    f = tmp_path / "watts"
    f.write_text("4.0\n")
    meter, _ = auto_meter(isolated(tmp_path, external_file=str(f)))
    assert meter.source == "external-file"


def test_phase_meter_factory(tmp_path: Path) -> None:
    pm = phase_meter(isolated(tmp_path, link="lte"))
    assert pm.meter is pm.estimate and pm.estimate.link is LINK_PROFILES["lte"] and "using estimate" in pm.reason


def test_package_imports_without_optional_dependencies() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['pynvml'] = None; sys.modules['paho'] = None\n"
        "import edge_client.energy as e; m, r = e.auto_meter(e.EnergyConfig(rapl_root='/nonexistent'))\n"
        "assert 'numpy' not in sys.modules; print(m.source)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
