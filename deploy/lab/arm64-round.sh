#!/usr/bin/env bash
# The aarch64 part of the device lab (docs/lab.md): in the arm64 bookworm userland of
# arm64-rootfs.sh, with the client and infer profiles installed by arm64-install.sh exactly as the
# device guide says, an emulated aarch64 client joins a SIGNED run of a coordinator on this host
# over a real Mosquitto (loopback), beside one x86_64 client, and completes the rounds; then the
# final model, exported on the host, runs in the userland's infer-only venv (fedpara-infer, no torch).
#
# Usage (root): deploy/lab/arm64-round.sh [DIR] [WORK]   (defaults /var/lib/fedpara-lab/arm64, a temp dir)
# Environment: ROUNDS (2), MODEL (mlp), LIMIT (600 samples a client), QEMU_CPU (cortex-a72).
# Prints one summary line per step and writes WORK/result.json. Takes ~5-10 min on 2 cores.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
DIR=${1:-/var/lib/fedpara-lab/arm64}
WORK=${2:-$(mktemp -d /tmp/fedpara-arm64-XXXX)}
ROUNDS=${ROUNDS:-2}
MODEL=${MODEL:-mlp}
LIMIT=${LIMIT:-600}
export QEMU_CPU=${QEMU_CPU:-cortex-a72}   # the Raspberry Pi 4's core (ARMv8.0)
FEDPARA=${FEDPARA:-$SRC/.venv/bin/fedpara}  # the host's (x86_64) install
[ -x "$DIR/opt/fedpara/venv/bin/fedpara" ] && [ -x "$DIR/opt/fedpara/venv-infer/bin/fedpara-infer" ] \
  || bash "$HERE/arm64-install.sh" "$DIR" client infer
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
RUN=lab-arm64-$(date +%H%M%S)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  mountpoint -q "$DIR/proc" && umount "$DIR/proc" || true
}
trap cleanup EXIT
mountpoint -q "$DIR/proc" || mount -t proc proc "$DIR/proc"
# no /sys: with the host's, the cpuinfo library in onnxruntime 1.32 parses an x86 topology as an
# arm64 one and crashes (SIGSEGV); without it torch and onnxruntime warn and use their defaults

# a real Mosquitto on a free loopback port (Debian's, as on a site broker)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n' "$PORT" > "$WORK/mosquitto.conf"
/usr/sbin/mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
pids+=($!)
BROKER=mqtt://127.0.0.1:$PORT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done

# keys: one Ed25519 identity per machine; the device gets its own key and the coordinator's public key
"$FEDPARA" keys new coordinator x86-laptop --dir "$WORK/keys" >/dev/null
"$FEDPARA" keys new arm-pi --dir "$WORK/keys/clients" >/dev/null
cp "$WORK/keys/x86-laptop.pub" "$WORK/keys/clients/"
install -d -m 0700 "$DIR/etc/fedpara-lab/keys"
install -m 0600 "$WORK/keys/clients/arm-pi.key" "$DIR/etc/fedpara-lab/keys/arm-pi.key"
install -m 0644 "$WORK/keys/coordinator.pub" "$DIR/etc/fedpara-lab/keys/coordinator.pub"
DATA="fashion-mnist,partition=iid,clients=2,limit=$LIMIT"
t0=$(date +%s)
"$FEDPARA" coordinator --broker "$BROKER" --run "$RUN" --model "$MODEL" --rounds "$ROUNDS" --min-clients 2 \
  --deadline 1800 --wait-clients-s 1800 --batch-size 32 --test-data fashion-mnist,limit=2000 \
  --coordinator-key "$WORK/keys/coordinator.key" --trusted-keys "$WORK/keys/clients" --out "$WORK/run" \
  >"$WORK/coordinator.log" 2>&1 &
coord=$!
pids+=($coord)
OMP_NUM_THREADS=1 "$FEDPARA" client --broker "$BROKER" --run "$RUN" --client-id x86-laptop --data "$DATA,index=1" \
  --key "$WORK/keys/x86-laptop.key" --coordinator-pub "$WORK/keys/coordinator.pub" \
  --state-dir "$WORK/x86-laptop" --energy estimate >"$WORK/x86-laptop.log" 2>&1 &
pids+=($!)
chroot "$DIR" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root QEMU_CPU="$QEMU_CPU" OMP_NUM_THREADS=1 \
  /opt/fedpara/venv/bin/fedpara -v client --broker "$BROKER" --run "$RUN" --client-id arm-pi --data "$DATA,index=0" \
  --key /etc/fedpara-lab/keys/arm-pi.key --coordinator-pub /etc/fedpara-lab/keys/coordinator.pub \
  --state-dir /var/lib/fedpara/arm-pi --energy estimate --energy-profile rpi4 >"$WORK/arm-pi.log" 2>&1 &
pids+=($!)
wait "$coord" && status=ok || status=FAILED
t1=$(date +%s)
echo "signed run $RUN: $status in $((t1 - t0)) s; coordinator log $WORK/coordinator.log, client logs $WORK/{arm-pi,x86-laptop}.log"
grep -E "round [0-9]+ done" "$WORK/arm-pi.log" | sed 's/^/  arm-pi: /' || true
[ "$status" = ok ] || { tail -20 "$WORK/coordinator.log" "$WORK/arm-pi.log"; exit 1; }

# the final model: composed and exported on the host, run on the "device" without torch
"$FEDPARA" export "$WORK/run" --out "$WORK/model.onnx" >"$WORK/export.log" 2>&1
cp "$WORK/model.onnx" "$DIR/opt/fedpara/model.onnx"
chroot "$DIR" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root QEMU_CPU="$QEMU_CPU" \
  /opt/fedpara/venv-infer/bin/fedpara-infer /opt/fedpara/model.onnx --data fashion-mnist,limit=1000 --runs 20 --json \
  >"$WORK/infer.json" 2>"$WORK/infer.log"
python3 - "$WORK" "$RUN" "$QEMU_CPU" "$((t1 - t0))" "$DIR" <<'EOF'
import json, sys, pathlib, platform, subprocess
work, run, cpu, wall, root = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
rows = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
infer = json.loads((work / "infer.json").read_text())
arm = (work / "arm-pi.log").read_text()
torch_v = subprocess.run(["/usr/sbin/chroot", root, "/opt/fedpara/venv/bin/python", "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, env={"QEMU_CPU": cpu, "PATH": "/usr/bin:/bin"}).stdout.strip()
result = {"run": run, "qemu_cpu": cpu, "wall_s": wall, "torch_aarch64": torch_v, "rounds": len(rows),
          "accuracy": rows[-1].get("accuracy"),
          "arm_pi_in_every_round": all("arm-pi" in r.get("clients", []) for r in rows),
          "arm_pi_train_s": [r["client_metrics"]["arm-pi"]["train_s"] for r in rows if "arm-pi" in r.get("client_metrics", {})],
          "signed": "insecure" not in arm, "infer": infer}
(work / "result.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k != "infer"}))
print(f"fedpara-infer on aarch64 (onnxruntime, no torch): accuracy {infer['accuracy']:.3f} on {infer['samples']} "
      f"samples, batch-1 p50 {infer['batch1']['p50_ms']:.2f} ms, batch-64 {infer['batch64']['throughput_per_s']:.0f} "
      "samples/s (emulated)")
EOF
