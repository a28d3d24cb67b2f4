"""RAPL meter against a fake powercap tree with the kernel's file names and formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.energy import EnergyError, MeterUnavailable, RaplMeter, counter_delta
from edge_client.energy.base import default_read_text

MAX = 262143328850  # a real max_energy_range_uj value (Intel, 61 uJ units x 2^32)


def write_zone(root: Path, dirname: str, name: str, energy_uj: int, max_uj: int = MAX) -> Path:
    d = root / dirname
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "enabled").write_text("1\n")
    return d


def set_energy(zone: Path, uj: int) -> None:
    (zone / "energy_uj").write_text(f"{uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control-type directory has no energy_uj
    (root / "intel-rapl" / "enabled").write_text("1\n")
    return {
        "root": root,
        "pkg": write_zone(root, "intel-rapl:0", "package-0", 1_000_000),
        "core": write_zone(root, "intel-rapl:0:0", "core", 500_000),
        "uncore": write_zone(root, "intel-rapl:0:1", "uncore", 100_000),
        "dram": write_zone(root, "intel-rapl:0:2", "dram", 2_000_000),
        "psys": write_zone(root, "intel-rapl:1", "psys", 9_000_000),
    }


@pytest.mark.parametrize(
    ("start", "end", "max_range", "want"),
    [(10, 25, 100, 15), (90, 5, 100, 15), (0, 0, 100, 0), (MAX - 850, 1000, MAX, 1850)],
)
def test_counter_delta(start: int, end: int, max_range: int, want: int) -> None:
    assert counter_delta(start, end, max_range) == want


def test_package_plus_dram_summed_core_uncore_psys_ignored(powercap: dict[str, Path]) -> None:
    m = RaplMeter(powercap["root"], poll_s=100)
    assert m.source == "rapl:package-0+dram"
    m.start()
    set_energy(powercap["pkg"], 1_000_000 + 3_500_000)
    set_energy(powercap["dram"], 2_000_000 + 500_000)
    set_energy(powercap["core"], 10**9)
    set_energy(powercap["psys"], 10**10)
    r = m.stop()
    assert r.joules == pytest.approx(4.0)
    assert r.measured and r.source == "rapl:package-0+dram"
    assert r.detail["zones_j"] == {"package-0": pytest.approx(3.5), "dram": pytest.approx(0.5)}
    assert r.seconds >= 0


def test_wraparound(powercap: dict[str, Path]) -> None:
    set_energy(powercap["pkg"], MAX - 1_000_000)
    m = RaplMeter(powercap["root"], poll_s=100)
    m.start()
    set_energy(powercap["pkg"], 2_000_000)  # wrapped past max_energy_range_uj
    r = m.stop()
    assert r.detail["zones_j"]["package-0"] == pytest.approx(3.0)
    assert r.detail["wraps"] == 1


def test_two_wraps_are_caught_by_the_periodic_read(powercap: dict[str, Path]) -> None:
    m = RaplMeter(powercap["root"], poll_s=100)
    m.start()  # package at 1 J
    set_energy(powercap["pkg"], MAX - 1)  # ~MAX uJ later (what the poll thread would see)
    m._accumulate()
    set_energy(powercap["pkg"], 1_000_000)  # wrapped again: another ~MAX uJ
    r = m.stop()
    assert r.detail["zones_j"]["package-0"] == pytest.approx(MAX / 1e6, rel=1e-9)
    assert r.detail["wraps"] == 1


def test_nested_subzones_and_two_packages(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    write_zone(root, "intel-rapl:0", "package-0", 0)
    write_zone(root, "intel-rapl:0/intel-rapl:0:0", "dram", 0)  # nested layout
    write_zone(root, "intel-rapl:1", "package-1", 0)
    m = RaplMeter(root, poll_s=100)
    assert m.source == "rapl:package-0+package-1+dram"


def test_psys_alone_when_no_package(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    write_zone(root, "intel-rapl:0", "psys", 0)
    assert RaplMeter(root).source == "rapl:psys"


@pytest.mark.parametrize("setup", ["missing_root", "empty_root", "only_core"])
def test_missing_sensors_are_unavailable(tmp_path: Path, setup: str) -> None:
    root = tmp_path / "powercap"
    if setup != "missing_root":
        root.mkdir()
    if setup == "only_core":
        write_zone(root, "intel-rapl:0:0", "core", 0)
    with pytest.raises(MeterUnavailable):
        RaplMeter(root)


def denying(path: Path) -> str:
    if path.name == "energy_uj":
        raise PermissionError(13, "Permission denied", str(path))
    return default_read_text(path)


def test_permission_error_says_how_to_grant_access(powercap: dict[str, Path]) -> None:
    with pytest.raises(MeterUnavailable) as err:
        RaplMeter(powercap["root"], read_text=denying)
    msg = str(err.value)
    assert "permission denied" in msg
    assert f"sudo chmod o+r {powercap['pkg'] / 'energy_uj'}" in msg
    assert "udev" in msg and 'SUBSYSTEM=="powercap"' in msg


def test_counter_vanishing_mid_phase_is_an_energy_error(powercap: dict[str, Path]) -> None:
    m = RaplMeter(powercap["root"], poll_s=100)
    m.start()
    (powercap["dram"] / "energy_uj").unlink()
    with pytest.raises(EnergyError):
        m.stop()
    m.close()
