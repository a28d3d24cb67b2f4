"""Does a task fit in the memory this client has? Checked before training, so that a device too
small for the task's model and batch says so at once (a failure reply with the reason) instead of
being killed by the kernel half-way through the round (docs/lab.md, "Behaviour at the limits").

    needed    = OVERHEAD + 2 x trainable parameter bytes                 (gradients + momentum)
              + BACKWARD_FACTOR x (saved_fixed + saved_per_sample x batch)
    available = memory limit of our cgroup (v1 or v2) - what the cgroup uses now,
                or MemAvailable (/proc/meminfo) where that is smaller or there is no limit

``saved_*`` are measured, not guessed: one forward pass on 2 and on 4 training samples under
``torch.autograd.graph.saved_tensors_hooks`` adds up the bytes autograd keeps for the backward
pass (the fused LSTM's workspace included); their difference is the per-sample cost, the rest is
fixed (composed FedPara weights, per step). Parameters themselves are not counted (they exist
already). ``BACKWARD_FACTOR`` covers the gradients flowing back beside what was saved;
``OVERHEAD`` the first backward's allocations (autograd engine, oneDNN scratch, allocator slack):
both were set from the peak RSS of real rounds (docs/lab.md, "Fit check"), on the side of
refusing a task a little early rather than being killed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MB = 1 << 20
OVERHEAD = 48 * MB
BACKWARD_FACTOR = 2.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)


class TaskDoesNotFit(ValueError):
    """The task's model and batch need more memory than this client has (the reason is the text)."""


@dataclass(frozen=True)
class Memory:
    available: int  # bytes this process may still allocate
    limit: int | None  # the cgroup's limit, bytes (None: none set)
    source: str  # where ``available`` came from


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _own_cgroups(proc: Path) -> dict[str, str]:
    """controller -> our cgroup path from ``/proc/self/cgroup`` ("" is the v2 hierarchy)."""
    out = {}
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def cgroup_memory(root: Path = CGROUP_ROOT, proc: Path = Path("/proc/self/cgroup")) -> tuple[int, int] | None:
    """(limit, usage) in bytes of our memory cgroup, or None where no limit is set on it. The
    tightest limit of our cgroup and its ancestors counts; usage is our own cgroup's."""
    groups = _own_cgroups(proc)
    candidates = []
    if "memory" in groups:  # cgroup v1
        candidates.append((root / "memory", groups["memory"].lstrip("/"), "memory.limit_in_bytes",
                           "memory.usage_in_bytes"))
    if "" in groups:  # cgroup v2: the unified hierarchy at the root, or beside v1 in unified/
        for base in (root, root / "unified"):
            if (base / "cgroup.controllers").exists():
                candidates.append((base, groups[""].lstrip("/"), "memory.max", "memory.current"))
    for base, rel, limit_file, usage_file in candidates:
        here = base / rel
        usage = _read_int(here / usage_file)
        limits = []
        d = here
        while True:
            value = _read_int(d / limit_file)
            if value is not None:
                limits.append(value)
            if d == base or base not in d.parents:
                break
            d = d.parent
        if limits and usage is not None:
            return min(limits), usage
    return None


def _proc_kib(path: Path, key: str) -> int | None:
    """Bytes of the ``key: N kB`` line of a /proc file, None when it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    return _proc_kib(meminfo, "MemAvailable:")


def own_rss(status: Path = Path("/proc/self/status")) -> int | None:
    return _proc_kib(status, "VmRSS:")


def available_memory(root: Path = CGROUP_ROOT, proc: Path = Path("/proc/self/cgroup"),
                     meminfo: Path = Path("/proc/meminfo"), status: Path = Path("/proc/self/status")) -> Memory | None:
    """What this process may still allocate: the smaller of its cgroup's headroom and the
    machine's MemAvailable. None where neither can be read (not Linux).

    In a cgroup, "used" is the larger of what the cgroup is charged and our own RSS: a page is
    charged to the cgroup that first read it, so library pages (torch's, ~80 MB) already cached by
    another process are in our RSS but not in our cgroup's usage; on a board they take RAM."""
    cg = cgroup_memory(root, proc)
    free = mem_available(meminfo)
    options = []
    if cg is not None:
        limit, usage = cg
        usage = max(usage, own_rss(status) or 0)
        options.append((max(0, limit - usage), limit, f"cgroup limit {limit / MB:.0f} MB, {usage / MB:.0f} MB used"))
    if free is not None:
        options.append((free, cg[0] if cg else None, f"MemAvailable {free / MB:.0f} MB"))
    if not options:
        return None
    available, limit, source = min(options, key=lambda o: o[0])
    return Memory(available, limit, source)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for the backward pass of ``model(x)`` (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    # eval mode: no running statistics updated, no dropout drawing from the global generator; the
    # model's training is left exactly as it would have been without this check
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        del out
    finally:
        model.train(was_training)
    return total


def training_bytes(model: nn.Module, samples: torch.Tensor, batch_size: int) -> int:
    """Estimated memory one training step at ``batch_size`` adds, from two small forward passes
    on ``samples`` (at least 4 of them, float, as the model takes them)."""
    if len(samples) < 4:
        raise ValueError(f"need at least 4 samples to measure, got {len(samples)}")
    s2, s4 = saved_bytes(model, samples[:2]), saved_bytes(model, samples[:4])
    per_sample = max(0.0, (s4 - s2) / 2)
    fixed = max(0.0, s2 - 2 * per_sample)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(OVERHEAD + 2 * trainable + BACKWARD_FACTOR * (fixed + per_sample * batch_size))


def check_fit(model: nn.Module, data, batch_size: int, *, what: str = "the task",
              memory: Memory | None = None) -> int:
    """Raise :class:`TaskDoesNotFit` when training ``model`` on ``data`` at ``batch_size`` needs
    more than the memory available; returns the estimate (bytes). No limit known: no check.
    ``FEDPARA_FIT_CHECK=0`` in the environment turns the check off (lab tests of the kernel's
    OOM killer)."""
    if os.environ.get("FEDPARA_FIT_CHECK", "1") == "0":
        return 0
    n = min(len(data), 4)
    if n < 4:
        return 0  # too little data to measure; a 3-sample round fits anywhere a model does
    samples = torch.stack([data[i][0] for i in range(n)])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    need = training_bytes(model, samples.to(device), min(batch_size, len(data)))
    mem = memory if memory is not None else available_memory()
    if mem is None or device.type != "cpu":  # CUDA memory is not what the cgroup limits
        return need
    if need > mem.available:
        raise TaskDoesNotFit(
            f"{what} needs about {need / MB:.0f} MB to train at batch {batch_size}, this client has "
            f"{mem.available / MB:.0f} MB ({mem.source}); a smaller batch size or model would fit")
    return need
