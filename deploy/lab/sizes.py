#!/usr/bin/env python3
"""Download size of each install profile per platform: the wheels pip would fetch from plain PyPI
(none of this machine's pip configuration), downloaded and added up (docs/devices.md).

    deploy/lab/sizes.py --platform aarch64                 # what a Pi or a Jetson (CPU path) fetches
    deploy/lab/sizes.py --platform x86_64 --torch-wheel torch-2.13.0+cpu-...-x86_64.whl

aarch64: pip's resolver with the aarch64 manylinux tags up to glibc 2.36 and ``platform_machine``
answering aarch64 (the markers of pyproject.toml evaluate as on the board: torch < 2.10).
x86_64: PyPI's torch is the CUDA build, so torch is left out of the resolution and the CPU wheel
given with ``--torch-wheel`` (PyTorch's CPU index, which deploy/install.sh uses) is counted instead.
Installed sizes come from real venvs (deploy/lab/arm64-install.sh, deploy/install.sh), not from here.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_loader = importlib.machinery.SourceFileLoader("check_aarch64", str(ROOT / ".ci" / "check-aarch64"))
check = importlib.util.module_from_spec(importlib.util.spec_from_loader(_loader.name, _loader))
_loader.exec_module(check)
MB = 1e6


def download(reqs: list[str], platform: str, python: str, dest: Path) -> list[Path]:
    runner = ["-c", check.AARCH64_PIP] if platform == "aarch64" else ["-m", "pip"]
    r = subprocess.run([sys.executable, *runner, "download", "-q", "--disable-pip-version-check",
                        "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
                        *check.platform_args(platform, "2.36"), "-d", str(dest), *reqs],
                       capture_output=True, text=True, env=check.plain_pypi_env())
    if r.returncode != 0:
        raise SystemExit(f"pip download failed for {platform}: {r.stderr[-2000:]}")
    return sorted(dest.glob("*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", choices=["aarch64", "x86_64"], default="aarch64")
    ap.add_argument("--profiles", default="client,infer,coordinator,export")
    ap.add_argument("--python", default="3.11")
    ap.add_argument("--torch-wheel", type=Path, help="x86_64: the CPU torch wheel to count")
    args = ap.parse_args()
    table = check.profiles()
    print(f"| profile | platform | download MB | wheels | torch | largest (MB) |\n|---|---|---|---|---|---|")
    for profile in args.profiles.split(","):
        reqs = table[profile]
        if args.platform == "x86_64" and any(check._name(r) == "torch" for r in reqs):
            if args.torch_wheel is None:
                raise SystemExit("x86_64 profiles with torch need --torch-wheel (PyPI's torch is CUDA)")
            # the CPU wheel itself: pip resolves its own requirements (sympy, networkx, ...) from PyPI
            reqs = [r for r in reqs if check._name(r) != "torch"] + [str(args.torch_wheel.resolve())]
        with tempfile.TemporaryDirectory() as tmp:
            wheels = download(reqs, args.platform, args.python, Path(tmp))
            sizes = {w.name: w.stat().st_size for w in wheels}
        torch = next((n.split("-")[1] for n in sizes if n.startswith("torch-")), "-")
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        print(f"| {profile} | {args.platform} | {sum(sizes.values()) / MB:.0f} | {len(sizes)} | {torch} | "
              + ", ".join(f"{re.split(r'-', n)[0]} {s / MB:.1f}" for n, s in largest) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
