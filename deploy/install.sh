#!/usr/bin/env bash
# Install fedpara-edge with one install profile into the virtual environment $FEDPARA_VENV, with
# the torch build that fits the machine (docs/devices.md, "Install profiles"):
#
#   FEDPARA_VENV=/opt/fedpara/venv deploy/install.sh client      # Pi, Jetson, x86_64 laptop alike
#
# PROFILE: client | coordinator | infer | export | broker | all (pyproject.toml's extras).
# What it does per platform (FEDPARA_PLATFORM overrides the detection):
#   arm-cpu  aarch64 without an NVIDIA GPU (Raspberry Pi 3/4/5, Zero 2 W, other arm64 boards):
#            plain PyPI; pyproject.toml caps torch below 2.11 on aarch64, the last CPU-only build
#   jetson   aarch64 with /etc/nv_tegra_release: the venv sees the system site-packages, so the
#            torch that JetPack (or NVIDIA's wheel for it) installed is kept; with none there it
#            stops and says so, unless FEDPARA_JETSON_CPU=1 (then PyPI's CPU torch, as arm-cpu)
#   x86-cpu  x86_64: CPU torch from FEDPARA_TORCH_INDEX (default PyTorch's CPU index; empty: pip's
#            configured indexes), then the profile pinned by constraints.txt
# Then it checks the result: on arm-cpu and x86-cpu no nvidia-*, triton or cuda-* package may be
# installed; it prints torch's version and the venv's size.
# Environment: FEDPARA_VENV (required), FEDPARA_PYTHON (default python3, >= 3.10),
# FEDPARA_PLATFORM, FEDPARA_TORCH_INDEX, FEDPARA_JETSON_CPU; PIP_* variables pass through to pip.
set -euo pipefail
PROFILE=${1:-}
case "$PROFILE" in
  client|coordinator|infer|export|broker|all) ;;
  *) echo "usage: FEDPARA_VENV=DIR $0 client|coordinator|infer|export|broker|all" >&2; exit 2 ;;
esac
VENV=${FEDPARA_VENV:?set FEDPARA_VENV to the virtual environment to install into, e.g. /opt/fedpara/venv}
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${FEDPARA_PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || { echo "$PY is older than 3.10 (JetPack 5 ships 3.8): set FEDPARA_PYTHON to a newer one" >&2; exit 1; }

platform=${FEDPARA_PLATFORM:-auto}
if [ "$platform" = auto ]; then
  case "$(uname -m)" in
    aarch64|arm64)
      if [ -e /etc/nv_tegra_release ] || grep -qs "NVIDIA Jetson" /proc/device-tree/model; then
        platform=jetson
      else
        platform=arm-cpu
      fi ;;
    x86_64) platform=x86-cpu ;;
    *) echo "$(uname -m): no torch wheels on PyPI for this machine (32-bit Raspberry Pi OS: use the 64-bit one)" >&2
       exit 1 ;;
  esac
fi
[ "$platform" = jetson ] && [ "${FEDPARA_JETSON_CPU:-0}" = 1 ] && platform=arm-cpu
needs_torch=1
case "$PROFILE" in infer|broker) needs_torch=0 ;; esac
echo "fedpara install: profile $PROFILE, platform $platform, venv $VENV"

pip_args=()
has_torch() { "$1" -c "import torch" 2>/dev/null; }
case "$platform" in
  jetson)
    if [ "$needs_torch" = 1 ] && ! has_torch "$PY" && ! { [ -x "$VENV/bin/python" ] && has_torch "$VENV/bin/python"; }; then
      echo "no torch for $PY: install NVIDIA's torch wheel for your JetPack first (docs/devices.md, Jetson)," >&2
      echo "or set FEDPARA_JETSON_CPU=1 to train on the CPU with PyPI's build" >&2
      exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" ;;
  arm-cpu)
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" ;;
  x86-cpu)
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    pip_args=(-c "$SRC/constraints.txt")
    index=${FEDPARA_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
    if [ "$needs_torch" = 1 ] && [ -n "$index" ]; then
      "$VENV/bin/python" -m pip install -q "${pip_args[@]}" --index-url "$index" torch
    fi ;;
  *) echo "FEDPARA_PLATFORM: arm-cpu | jetson | x86-cpu, got $platform" >&2; exit 2 ;;
esac
"$VENV/bin/python" -m pip install -q "${pip_args[@]}" -e "$SRC[$PROFILE]"

# what landed: no CUDA packages where there is no NVIDIA GPU; torch's build; the venv's size
"$VENV/bin/python" - "$platform" "$needs_torch" <<'EOF'
import importlib.metadata as md
import re
import sys

platform, needs_torch = sys.argv[1], sys.argv[2] == "1"
names = sorted({d.metadata["Name"].lower() for d in md.distributions()})
cuda = [n for n in names if re.match(r"(nvidia-|triton$|cuda-)", n)]
if cuda and platform != "jetson":
    sys.exit(f"CUDA packages installed on a {platform} machine: {', '.join(cuda)}")
if needs_torch:
    import torch
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); "
          f"{len(names)} distributions, no CUDA packages" if not cuda else f"CUDA packages: {cuda}")
EOF
echo "venv size: $(du -sm "$VENV" | cut -f1) MB"
