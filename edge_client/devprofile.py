"""Device profiles: a client inside the CPU share and memory of a real device, enforced by the
kernel (cgroups), on any Linux machine (docs/lab.md).

A profile is data (``deploy/lab/profiles.toml``): the device's cores, their speed relative to one
core of the lab host, its RAM and what its OS keeps of it, and its energy-estimate figures.
``fedpara client --profile NAME`` (and ``fedpara demo --device-profiles A,B``) run the client as a
child process inside a fresh cgroup:

    CPU     cfs quota = min(threads, cores) x core_speed host cores (v1 cpu.cfs_quota_us, v2 cpu.max)
    memory  limit = memory_mb - reserved_mb (v1 memory.limit_in_bytes, v2 memory.max; no swap)

The kernel enforces both: a client over its memory is killed by the OOM killer, as on the device.
This process stays outside the cgroup, waits for the child, prints its peak RSS against the limit
and whether the kernel killed it, removes the cgroup and exits with the child's status (137 for a
kill, so that systemd's ``Restart=on-failure`` restarts it).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1 << 20
ENV_PROFILES = "FEDPARA_PROFILES"
CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "fedpara-lab"  # every profile's cgroup lives under this one
PERIOD_US = 100_000
# The lab group's CPU weight, in host tasks: under group scheduling the whole group otherwise
# competes like ONE process of the host, so on a busy host every device of the lab shares that
# one task's CPU and a "laptop" runs as slowly as a "Pi Zero". Weighing it like this many tasks
# leaves each device's quota (cpu.cfs_quota_us / cpu.max) as what limits it.
LAB_WEIGHT_TASKS = 16


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    cores: int  # the device's CPU cores
    core_speed: float  # one device core's speed, as a fraction of one core of the lab host
    memory_mb: int  # the device's RAM
    reserved_mb: int  # what the OS, the GPU split or a desktop keep of it (not the client's)
    energy: str = "estimate"  # energy meter on the device (the lab always estimates)
    energy_profile: str = "laptop"  # edge_client/energy/estimate.py DEVICE_PROFILES
    cpu_watts: float | None = None  # overrides of the energy profile's figures
    idle_watts: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ValueError(f"{self.name}: cores must be >= 1, got {self.cores}")
        if not 0 < self.core_speed <= 16:
            raise ValueError(f"{self.name}: core_speed must be in (0, 16], got {self.core_speed}")
        if not 0 <= self.reserved_mb < self.memory_mb:
            raise ValueError(f"{self.name}: reserved_mb must be in [0, memory_mb), got {self.reserved_mb}")

    @property
    def client_memory_bytes(self) -> int:
        return (self.memory_mb - self.reserved_mb) * MB

    def cpu_quota(self, threads: int, host_cpus: int | None = None) -> float:
        """Host cores' worth of CPU time per second for a client training with ``threads``."""
        host = host_cpus or os.cpu_count() or 1
        return min(min(threads, self.cores) * self.core_speed, float(host))


def profiles_path() -> Path:
    """``$FEDPARA_PROFILES``, else ``deploy/lab/profiles.toml`` of this checkout."""
    env = os.environ.get(ENV_PROFILES)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "deploy" / "lab" / "profiles.toml"


def load_profiles(path: Path | None = None) -> dict[str, DeviceProfile]:
    path = path or profiles_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no device profiles at {path}: set {ENV_PROFILES} to a profiles.toml "
                         "(deploy/lab/profiles.toml in a checkout)") from None
    out = {}
    for name, fields in data.get("profile", {}).items():
        try:
            out[name] = DeviceProfile(name=name, **fields)
        except TypeError as exc:
            raise ValueError(f"{path}: profile {name}: {exc}") from None
    return out


def get_profile(name: str, path: Path | None = None) -> DeviceProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ValueError(f"unknown device profile {name!r}; choose one of {', '.join(profiles)}")
    return profiles[name]


# --- cgroups -------------------------------------------------------------------------------
def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_layout(root: Path = CGROUP_ROOT) -> str | None:
    """'v1' (cpu and memory controllers mounted apart), 'v2' (unified, both available) or None."""
    if (root / "cpu" / "cpu.cfs_quota_us").exists() and (root / "memory" / "memory.limit_in_bytes").exists():
        return "v1"
    controllers = _read(root / "cgroup.controllers").split()
    if "cpu" in controllers and "memory" in controllers:
        return "v2"
    return None


def unavailable_reason(root: Path = CGROUP_ROOT) -> str | None:
    """Why profiles cannot be enforced here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "device profiles need Linux cgroups"
    layout = cgroup_layout(root)
    if layout is None:
        return f"no cgroup cpu and memory controllers under {root} (v1 cpu/ + memory/, or v2 with both)"
    base = root / ("memory" if layout == "v1" else "")
    if not os.access(base, os.W_OK):
        return f"creating cgroups under {base} needs root (or a delegated cgroup)"
    return None


def cgroup_dirs(name: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The directories of the profile cgroup ``name`` (one per v1 controller, one for v2)."""
    if cgroup_layout(root) == "v1":
        return [root / "cpu" / GROUP / name, root / "memory" / GROUP / name]
    return [root / GROUP / name]


def cgroup_name(profile: str, label: str, runner_pid: int) -> str:
    """The cgroup :func:`run_client` makes for a client (``label``: its id) run by ``runner_pid``."""
    return f"{profile}-{label}-{runner_pid}"


class Cgroup:
    """One leaf cgroup with a CPU quota and a memory limit (cgroup v1 or v2)."""

    def __init__(self, name: str, cpu_quota: float, memory_bytes: int, root: Path = CGROUP_ROOT) -> None:
        self.layout = cgroup_layout(root)
        if self.layout is None:
            raise RuntimeError(unavailable_reason(root) or "no cgroups")
        self.name, self.cpu_quota, self.memory_bytes = name, cpu_quota, memory_bytes
        quota = str(max(1000, int(cpu_quota * PERIOD_US)))
        if self.layout == "v1":
            self.dirs = cgroup_dirs(name, root)
            for d in self.dirs:
                d.mkdir(parents=True, exist_ok=True)
            cpu, mem = self.dirs
            _write(cpu.parent / "cpu.shares", str(1024 * LAB_WEIGHT_TASKS))
            _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", quota)
            _write(mem / "memory.limit_in_bytes", str(memory_bytes))
            for f, v in (("memory.memsw.limit_in_bytes", str(memory_bytes)), ("memory.swappiness", "0")):
                try:  # no swap beyond the limit (where swap accounting exists)
                    _write(mem / f, v)
                except OSError:
                    pass
            self.mem = mem
        else:
            group = root / GROUP
            group.mkdir(exist_ok=True)
            for d in (root, group):
                try:
                    _write(d / "cgroup.subtree_control", "+cpu +memory")
                except OSError as exc:
                    raise RuntimeError(f"cannot enable cpu and memory in {d}: {exc}") from None
            _write(group / "cpu.weight", str(100 * LAB_WEIGHT_TASKS))  # v2: 100 is one task's weight
            leaf = group / name
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cpu.max", f"{quota} {PERIOD_US}")
            _write(leaf / "memory.max", str(memory_bytes))
            try:
                _write(leaf / "memory.swap.max", "0")
            except OSError:
                pass
            self.dirs, self.mem = [leaf], leaf

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def peak_bytes(self) -> int | None:
        """Most memory the cgroup used (page cache included), where the kernel keeps it."""
        text = _read(self.mem / ("memory.max_usage_in_bytes" if self.layout == "v1" else "memory.peak")).strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        """Processes of this cgroup the kernel's OOM killer killed."""
        text = _read(self.mem / ("memory.oom_control" if self.layout == "v1" else "memory.events"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # the last process may still be leaving
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


# --- running a client inside a profile -----------------------------------------------------
def strip_profile_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--profile NAME`` / ``--profile=NAME`` / ``--profile-report PATH``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--profile", "--profile-report"):
            skip = True
            continue
        if a.startswith(("--profile=", "--profile-report=")):
            continue
        out.append(a)
    return out


def child_args(profile: DeviceProfile, argv: list[str]) -> list[str]:
    """The client's own arguments inside the profile: the energy estimate of the device class
    unless the command line chose a meter."""
    args = strip_profile_args(argv)
    if not any(a == "--energy" or a.startswith("--energy=") for a in args):
        args += ["--energy", "estimate", "--energy-profile", profile.energy_profile]
        if profile.cpu_watts is not None:
            args += ["--energy-cpu-watts", str(profile.cpu_watts)]
        if profile.idle_watts is not None:
            args += ["--energy-idle-watts", str(profile.idle_watts)]
    return args


def run_client(profile: DeviceProfile, argv: list[str], *, threads: int, label: str,
               report: str | None = None, echo=None) -> int:
    """Run ``fedpara ARGV`` (a ``client`` command line, ``--profile`` removed here) as a child
    inside a fresh cgroup for ``profile``; returns the child's exit status (128 + signal when a
    signal ended it). ``echo`` (a CLI's print) is told the limits and the outcome; else they are
    logged."""
    echo = echo or log.info
    from fedpara.runtime.parent import child_env, exit_with_parent

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"--profile {profile.name}: {reason}")
    exit_with_parent()  # started by fedpara demo: end with it (and take the client along)
    quota = profile.cpu_quota(threads)
    cg = Cgroup(cgroup_name(profile.name, label, os.getpid()), quota, profile.client_memory_bytes)
    cmd = [sys.executable, "-m", "fedpara.runtime.cli", *child_args(profile, argv)]
    echo(f"profile {profile.name} ({profile.description}): CPU {quota:.2f} host cores "
         f"({min(threads, profile.cores)} x {profile.core_speed}), memory {profile.client_memory_bytes / MB:.0f} MB "
         f"(cgroup {cg.layout} {GROUP}/{cg.name})")
    t0 = time.monotonic()
    try:
        child = subprocess.Popen(cmd, env=child_env(), preexec_fn=lambda: cg.add(os.getpid()))
    except BaseException:
        cg.remove()
        raise
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                _, status, usage = os.wait4(child.pid, 0)
                break
            except ChildProcessError:
                status, usage = 0, None
                break
            except InterruptedError:
                continue
        child.returncode = os.waitstatus_to_exitcode(status)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    peak_rss = usage.ru_maxrss * 1024 if usage is not None else None  # Linux: KiB
    result = {"profile": profile.name, "exit_code": code, "oom_kills": cg.oom_kills(),
              "peak_rss_bytes": peak_rss, "cgroup_peak_bytes": cg.peak_bytes(),
              "memory_limit_bytes": profile.client_memory_bytes, "cpu_quota": quota,
              "wall_s": time.monotonic() - t0}
    cg.remove()
    # the cgroup charges a page to whoever read it first: shared library pages cached by another
    # process on this host count in the client's RSS, not against its limit. On the board they
    # would take RAM, so a peak RSS over the limit means "does not fit" even without a kill.
    result["over_limit"] = bool(peak_rss and peak_rss > profile.client_memory_bytes)
    killed = " KILLED by the kernel's OOM killer (over its memory)" if result["oom_kills"] else ""
    rss = f"{peak_rss / MB:.0f} MB" if peak_rss else "?"
    echo(f"profile {profile.name}: client exited with {code}{killed}; peak RSS {rss} of "
         f"{profile.client_memory_bytes / MB:.0f} MB")
    if result["over_limit"] and not result["oom_kills"]:
        echo(f"profile {profile.name}: peak RSS over the device's memory: it would not fit on the board "
             "(shared library pages cached by other processes here are not charged to the cgroup)")
    if report:
        Path(report).write_text(json.dumps(result, indent=1))
    return code
