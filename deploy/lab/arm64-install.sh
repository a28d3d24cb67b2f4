#!/usr/bin/env bash
# In the arm64 userland of deploy/lab/arm64-rootfs.sh, install the client and infer profiles
# exactly as docs/devices.md tells a Raspberry Pi user (deploy/install.sh, plain PyPI), and record
# time, download and installed size. Usage (root): deploy/lab/arm64-install.sh [DIR] [PROFILE...]
# Writes DIR/opt/fedpara/install-<profile>.log and prints one line per profile (download sizes:
# deploy/lab/sizes.sh, on the host).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
DIR=${1:-/var/lib/fedpara-lab/arm64}
shift || true
PROFILES=("${@:-client infer}")
read -r -a PROFILES <<<"${PROFILES[*]}"
[ -x "$DIR/usr/bin/python3" ] || bash "$HERE/arm64-rootfs.sh" "$DIR"
export QEMU_CPU=${QEMU_CPU:-cortex-a72}   # a Pi 4's core; qemu's default "max" adds SVE/SME
# this checkout's tracked and new files (what a `git clone` would give, plus work in progress)
rm -rf "$DIR/opt/fedpara/src" && mkdir -p "$DIR/opt/fedpara/src"
(cd "$SRC" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) | tar -C "$DIR/opt/fedpara/src" -xf -
cp /etc/resolv.conf "$DIR/etc/resolv.conf"
# the host's CA bundle: where a proxy intercepts TLS, its CA is there and not in the userland's
mkdir -p "$DIR/etc/fedpara-lab"
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$DIR/etc/fedpara-lab/host-ca.crt"
mountpoint -q "$DIR/proc" || { mount -t proc proc "$DIR/proc"; trap 'umount "$DIR/proc"' EXIT; }
# no /sys: with the host's, the cpuinfo library in onnxruntime 1.32 parses an x86 topology as an
# arm64 one and crashes (SIGSEGV); without it torch and onnxruntime warn and use their defaults
for profile in "${PROFILES[@]}"; do
  venv=/opt/fedpara/venv; [ "$profile" = client ] || venv=/opt/fedpara/venv-$profile
  rm -rf "$DIR$venv"
  t0=$(date +%s)
  if chroot "$DIR" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root QEMU_CPU="$QEMU_CPU" PIP_CERT=/etc/fedpara-lab/host-ca.crt \
      FEDPARA_VENV="$venv" bash /opt/fedpara/src/deploy/install.sh "$profile" >"$DIR/opt/fedpara/install-$profile.log" 2>&1; then
    status=ok
  else
    status=FAILED
  fi
  t1=$(date +%s)
  size=$(du -sm "$DIR$venv" | cut -f1)
  echo "$profile: $status in $((t1 - t0)) s (emulated), venv $size MB; $(grep -E '^torch ' "$DIR/opt/fedpara/install-$profile.log" || true)"
  [ $status = ok ] || { tail -20 "$DIR/opt/fedpara/install-$profile.log"; exit 1; }
done
