"""Installs that fit the device (docs/devices.md, "Install profiles"): on aarch64 the profiles
with torch take a CPU-only build that runs on every board, Jetson keeps NVIDIA's, x86_64 is not
capped; deploy/install.sh refuses what it cannot do; the CI resolver check's verdict. Offline
(the resolver itself runs in .ci/check-aarch64, which CI runs)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "deploy" / "install.sh"
def _load(path: Path):
    loader = importlib.machinery.SourceFileLoader("check_aarch64", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


check = _load(ROOT / ".ci" / "check-aarch64")


def torch_specs(profile: str, machine: str) -> list:
    """The torch specifiers of ``profile`` whose markers hold on ``machine``."""
    env = {**default_environment(), "platform_machine": machine}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [Requirement(r) for r in extras[profile]]
    return [r.specifier for r in reqs if r.name == "torch" and (r.marker is None or r.marker.evaluate(env))]


@pytest.mark.parametrize("profile", ["client", "coordinator", "export"])
def test_aarch64_gets_a_cpu_only_torch_that_runs_on_armv8_0(profile):
    (spec,) = torch_specs(profile, "aarch64")
    assert spec.contains("2.9.1")  # the newest CPU-only aarch64 build that runs on a Pi 4 (ARMv8.0)
    assert not spec.contains("2.10.0")  # SIGILL on Cortex-A72/A53/A57
    assert not spec.contains("2.11.0") and not spec.contains("2.15.0")  # depend on CUDA 13
    # JetPack's own builds are kept (pip accepts an installed pre-release)
    assert spec.contains("2.5.0a0+872d972e41.nv24.08", prereleases=True)
    assert spec.contains("2.3.0", prereleases=True)


@pytest.mark.parametrize("profile", ["client", "coordinator", "export"])
def test_x86_64_and_macos_are_not_capped(profile):
    for machine in ("x86_64", "arm64"):
        (spec,) = torch_specs(profile, machine)
        assert spec.contains("2.13.0") and spec.contains("2.15.0")


def test_infer_and_broker_profiles_have_no_torch():
    for machine in ("aarch64", "x86_64"):
        assert torch_specs("infer", machine) == [] and torch_specs("broker", machine) == []


def test_the_resolver_check_names_every_cuda_package():
    def item(name, version="1"):
        return {"metadata": {"name": name, "version": version}}

    report = {"install": [item("torch", "2.15.0"), item("nvidia-cublas"), item("nvidia_cudnn_cu13"), item("triton"),
                          item("cuda-bindings"), item("cuda-toolkit"), item("numpy"), item("tritonclient")]}
    assert check.cuda_packages(report) == ["cuda-bindings", "cuda-toolkit", "nvidia-cublas", "nvidia-cudnn-cu13",
                                           "triton"]
    assert check.cuda_packages({"install": [item("torch", "2.9.1"), item("sympy")]}) == []
    assert check.resolved(report)["torch"] == "2.15.0"
    env = check.plain_pypi_env()
    assert env["PIP_CONFIG_FILE"] == os.devnull and not any(k.startswith("PIP_") and k != "PIP_CONFIG_FILE"
                                                            for k in env)


def run_install(*args, **env):
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("FEDPARA_")}, **env})


def test_install_script_needs_a_profile_and_a_venv(tmp_path):
    r = run_install()
    assert r.returncode == 2 and "usage" in r.stderr
    r = run_install("gpu")
    assert r.returncode == 2 and "usage" in r.stderr
    r = run_install("client")
    assert r.returncode != 0 and "FEDPARA_VENV" in r.stderr
    r = run_install("client", FEDPARA_VENV=str(tmp_path / "v"), FEDPARA_PLATFORM="riscv")
    assert r.returncode == 2 and "arm-cpu | jetson | x86-cpu" in r.stderr


def test_install_script_on_a_jetson_without_nvidias_torch_says_what_to_do(tmp_path):
    # a Python without torch stands for a JetPack on which NVIDIA's wheel is not installed yet
    python = tmp_path / "bare" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    r = run_install("client", FEDPARA_VENV=str(tmp_path / "v"), FEDPARA_PLATFORM="jetson", FEDPARA_PYTHON=str(python))
    assert r.returncode == 1 and "NVIDIA's torch wheel for your JetPack" in r.stderr and "FEDPARA_JETSON_CPU=1" in r.stderr
    assert not (tmp_path / "v").exists()  # nothing half-made


def test_install_script_refuses_a_python_older_than_3_10(tmp_path):
    old = tmp_path / "python3.8"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    r = run_install("client", FEDPARA_VENV=str(tmp_path / "v"), FEDPARA_PYTHON=str(old))
    assert r.returncode == 1 and "3.10" in r.stderr
