"""Device profiles as data and the fit check's arithmetic (edge_client/devprofile.py,
edge_client/fit.py, deploy/lab/profiles.toml); the demo's clients inside profiles (root only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fashion_mnist_available

import fedpara
from edge_client import devprofile, fit
from fedpara import models
from fedpara.training import train_epochs

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def test_the_fleet_profiles_are_all_there_and_sane():
    profiles = devprofile.load_profiles()
    assert {"pi-zero-2w", "pi4-1gb", "pi4-4gb", "pi5-4gb", "jetson-nano-4gb", "laptop"} <= set(profiles)
    for p in profiles.values():
        assert 0 < p.client_memory_bytes < p.memory_mb * MB and p.description
    zero, pi4, pi5, laptop = (profiles[n] for n in ("pi-zero-2w", "pi4-1gb", "pi5-4gb", "laptop"))
    assert zero.client_memory_bytes < 512 * MB < pi4.client_memory_bytes
    assert zero.core_speed < pi4.core_speed < pi5.core_speed < laptop.core_speed
    # the quota follows the threads the client trains with, up to the device's cores and the host's
    assert pi4.cpu_quota(1, host_cpus=2) == pytest.approx(0.18)
    assert pi4.cpu_quota(8, host_cpus=2) == pytest.approx(0.72)
    assert laptop.cpu_quota(4, host_cpus=2) == 2.0


def test_a_bad_profile_is_refused_naming_it(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[profile.x]\ndescription = "x"\ncores = 1\ncore_speed = 0.5\nmemory_mb = 100\nreserved_mb = 100\n')
    with pytest.raises(ValueError, match="x: reserved_mb"):
        devprofile.load_profiles(bad)
    with pytest.raises(ValueError, match="unknown device profile 'pi9'.*pi4-1gb"):
        devprofile.get_profile("pi9")
    with pytest.raises(ValueError, match="FEDPARA_PROFILES"):
        devprofile.load_profiles(tmp_path / "missing.toml")


def test_the_child_command_line_drops_the_profile_and_estimates_with_the_device_class():
    p = devprofile.get_profile("pi-zero-2w")
    argv = ["-v", "client", "--profile", "pi-zero-2w", "--profile-report=r.json", "--client-id", "a"]
    assert devprofile.child_args(p, argv) == ["-v", "client", "--client-id", "a", "--energy", "estimate",
                                              "--energy-profile", "rpi4", "--energy-cpu-watts", "0.45",
                                              "--energy-idle-watts", "0.6"]
    assert devprofile.child_args(p, ["client", "--energy", "off"]) == ["client", "--energy", "off"]


def _fake_v1(tmp_path: Path, limit: int, usage: int, parent_limit: int | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    leaf = root / "memory" / "fedpara-lab" / "x"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text(str(limit))
    (leaf / "memory.usage_in_bytes").write_text(str(usage))
    (root / "memory" / "fedpara-lab" / "memory.limit_in_bytes").write_text(str(parent_limit or 9223372036854771712))
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/fedpara-lab/x\n1:cpu:/fedpara-lab/x\n0::/\n")
    return root, proc


def test_memory_headroom_from_cgroup_v1_and_v2(tmp_path):
    root, proc = _fake_v1(tmp_path, 400 * MB, 250 * MB)
    assert fit.cgroup_memory(root, proc) == (400 * MB, 250 * MB)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    status = tmp_path / "status"
    status.write_text("Name: python\nVmRSS:\t  102400 kB\n")
    mem = fit.available_memory(root, proc, meminfo, status)
    assert mem.available == 150 * MB and mem.limit == 400 * MB and "cgroup limit 400 MB" in mem.source
    # our RSS counts when it is more than the cgroup is charged (library pages another process read first)
    status.write_text("VmRSS:\t  307200 kB\n")
    assert fit.available_memory(root, proc, meminfo, status).available == 100 * MB
    status.write_text("VmRSS:\t  102400 kB\n")
    # a tighter parent limit counts; the machine's own free memory counts when it is smaller
    root2, proc2 = _fake_v1(tmp_path / "b", 400 * MB, 250 * MB, parent_limit=300 * MB)
    assert fit.cgroup_memory(root2, proc2) == (300 * MB, 250 * MB)
    meminfo.write_text("MemAvailable: 51200 kB\n")
    assert fit.available_memory(root, proc, meminfo, status).available == 50 * MB
    # cgroup v2
    v2 = tmp_path / "v2"
    (v2 / "lab").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "lab" / "memory.max").write_text(f"{300 * MB}\n")
    (v2 / "lab" / "memory.current").write_text(f"{100 * MB}\n")
    (v2 / "memory.max").write_text("max\n")
    proc.write_text("0::/lab\n")
    assert fit.cgroup_memory(v2, proc) == (300 * MB, 100 * MB)
    # no limit anywhere
    (v2 / "lab" / "memory.max").write_text("max\n")
    assert fit.cgroup_memory(v2, proc) is None


def _data(n=64, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_the_fit_check_refuses_a_batch_too_big_and_grows_with_the_batch():
    model = fedpara.convert(models.build("cnn28", num_classes=10), ratio=0.1)
    data = _data()
    small, big = (fit.training_bytes(model, torch.stack([data[i][0] for i in range(4)]), b) for b in (32, 3000))
    assert fit.OVERHEAD < small < big and big - small > 300 * MB  # ~0.25 MB a sample for cnn28
    roomy = fit.Memory(2 << 30, None, "test")
    assert fit.check_fit(model, data, 32, memory=roomy) == small  # batch capped by the data: 64 samples
    tight = fit.Memory(small // 2, 400 * MB, "cgroup limit 400 MB, 300 MB used")
    with pytest.raises(fit.TaskDoesNotFit, match=r"needs about \d+ MB to train at batch 32, this client has \d+ MB "
                                                 r"\(cgroup limit 400 MB"):
        fit.check_fit(model, data, 32, memory=tight, what="cnn28")
    assert isinstance(fit.TaskDoesNotFit("x"), ValueError)  # the client replies a failure for it


def test_the_fit_check_leaves_training_exactly_as_without_it():
    data = _data()

    def trained(check: bool):
        torch.manual_seed(0)
        model = fedpara.convert(models.build("cnn28", num_classes=10), ratio=0.1)
        if check:
            fit.check_fit(model, data, 16, memory=fit.Memory(2 << 30, None, "test"))
        torch.manual_seed(5)  # the same global state either way: the check must not consume any
        train_epochs(model, data, epochs=1, batch_size=16, lr=0.1, seed=3)
        return [p.detach().clone() for p in model.parameters()], torch.rand(1)

    (a, ra), (b, rb) = trained(False), trained(True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and torch.equal(ra, rb)


@pytest.mark.slow
@pytest.mark.skipif(devprofile.unavailable_reason() is not None,
                    reason=f"device profiles: {devprofile.unavailable_reason()}")
@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed")
def test_the_demo_runs_its_clients_inside_device_profiles(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "demo", "--device-profiles", "pi5-4gb,laptop",
                        "--rounds", "1", "--limit", "300", "--model", "mlp", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    logs = {i: (out / "logs" / f"client-{i}.log").read_text() for i in (0, 1)}
    assert "profile pi5-4gb (Raspberry Pi 5" in logs[0] and "memory 3796 MB" in logs[0]
    assert "profile laptop (" in logs[1] and "client exited with 0; peak RSS" in logs[1]
    # each client estimated its energy with its own device class
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert all(m["energy"]["source"] == "estimate" for m in row["client_metrics"].values())
    # the cgroups are gone with the clients
    for d in devprofile.cgroup_dirs("x"):
        assert not any(p.name.startswith(("pi5-4gb-client-0", "laptop-client-1")) for p in d.parent.iterdir())
    # a wrong name is said before anything starts
    r = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "demo", "--device-profiles", "pi9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown device profile 'pi9'" in r.stderr


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_the_lab_group_weighs_like_many_host_tasks(tmp_path, layout):
    """Under group scheduling the lab's group competes like one host task unless it is weighted:
    then on a busy host every device shared that one task's CPU whatever its quota."""
    if layout == "v1":
        for ctl, f in (("cpu", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes")):
            (tmp_path / ctl).mkdir()
            (tmp_path / ctl / f).write_text("-1")
    else:
        (tmp_path / "cgroup.controllers").write_text("cpu memory io")
    devprofile.Cgroup("laptop-c0-1", 0.8, 256 << 20, root=tmp_path)
    group = tmp_path / "cpu" / devprofile.GROUP if layout == "v1" else tmp_path / devprofile.GROUP
    weight, leaf_quota = (("cpu.shares", "16384"), ("laptop-c0-1/cpu.cfs_quota_us", "80000")) if layout == "v1" \
        else (("cpu.weight", "1600"), ("laptop-c0-1/cpu.max", "80000 100000"))
    assert (group / weight[0]).read_text() == weight[1] and (group / leaf_quota[0]).read_text() == leaf_quota[1]
