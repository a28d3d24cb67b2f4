#!/usr/bin/env bash
# Build an arm64 Debian bookworm userland (Python 3.11.2, as on Raspberry Pi OS bookworm) that runs
# on an x86_64 Debian host through qemu-user-static registered with binfmt_misc.
# Usage (root): deploy/lab/arm64-rootfs.sh [DIR]     (default /var/lib/fedpara-lab/arm64)
# Debian packages only: debootstrap, qemu-user-static, binfmt-support on the host; python3,
# python3-venv, ca-certificates and dataset-fashion-mnist in the userland. Idempotent.
set -euo pipefail
DIR=${1:-/var/lib/fedpara-lab/arm64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 1; }
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# binfmt_misc: mounted and qemu-aarch64 registered with the F (fix-binary) flag, so the
# interpreter is opened on the host and works inside the chroot without copying it there.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || { echo "qemu-aarch64 is registered without the F flag: reinstall qemu-user-static" >&2; exit 1; }
if [ ! -x "$DIR/usr/bin/python3" ]; then
  mkdir -p "$DIR"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,ca-certificates,dataset-fashion-mnist \
    bookworm "$DIR" "$MIRROR"
fi
cp /etc/resolv.conf "$DIR/etc/resolv.conf"
chroot "$DIR" /usr/bin/python3 -c 'import platform, sys; print("arm64 userland ready:", platform.machine(), sys.version.split()[0])'
