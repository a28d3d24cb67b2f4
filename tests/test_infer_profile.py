"""Inference without PyTorch: the numpy-only data path, and a fresh venv with only ``[infer]``.

The venv test installs the project with ``pip install -c constraints.txt -e ".[infer]"`` (pip's
cache or PyPI) into a new virtual environment, runs ``fedpara-infer`` there on a model exported
here, and ``fedpara infer`` (the full CLI) too, and checks that torch cannot be imported in that
environment.
"""
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_fmnist

import fedpara
from export.infer import load_inputs
from fedpara.data.idx import write_idx
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
NETWORK_ERRORS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "ConnectionError", "Max retries exceeded", "No matching distribution found")


def test_inference_modules_do_not_import_torch():
    code = ("import sys, export, export.cli, export.infer, export.onnx_model, fedpara.data.fashion_mnist; "
            "bad = sorted(m for m in ('torch', 'onnx', 'fedpara.models', 'fedpara.data.loaders') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=ROOT, timeout=60)


@needs_fmnist
@pytest.mark.parametrize("spec", ["fashion-mnist", "fashion-mnist,limit=300,seed=4"])
def test_numpy_reader_gives_the_samples_fedpara_data_gives(spec):
    from fedpara.data import load_test_data
    x, y = load_inputs(spec)
    tx, ty = load_test_data(spec).tensors
    assert x.dtype == np.float32 and x.shape == tuple(tx.shape)
    np.testing.assert_array_equal(x, tx.numpy())
    np.testing.assert_array_equal(y, ty.numpy())


def test_lean_loader_rejects_bad_values_and_routes_other_specs(tmp_path):
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_inputs("fashion-mnist,limit=0")
    with pytest.raises(ValueError, match="integer"):
        load_inputs("fashion-mnist,seed=x")
    x, y = load_inputs("synthetic,shape=1x28x28,n=64")  # through fedpara.data (torch is here)
    assert x.shape == (max(64 // 4, 10), 1, 28, 28) and len(y) == len(x)


def _fake_fmnist(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 200)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return root


def _data_spec(tmp_path: Path) -> str:
    try:
        from fedpara.data.fashion_mnist import find_fashion_mnist
        find_fashion_mnist()
        return "fashion-mnist,limit=500"
    except FileNotFoundError:
        return f"fashion-mnist,path={_fake_fmnist(tmp_path / 'fmnist')}"


@pytest.mark.slow
def test_infer_profile_venv_runs_without_torch(tmp_path):
    spec = ModelSpec(model="cnn28", scheme="fedpara", ratio=0.1)
    ckpt = save_checkpoint(tmp_path / "c.safetensors", fedpara.global_state(spec.build()), spec, round=1)
    model = tmp_path / "cnn28.onnx"
    assert main(["export", str(ckpt), "--out", str(model)]) == 0

    env_dir = tmp_path / "infer-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[infer]"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        if any(e in out for e in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package registry: {out.strip().splitlines()[-1]}")
        pytest.fail(f"pip install .[infer] failed:\n{out}")

    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, env=ENV)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, env=ENV).stdout
    assert "onnxruntime==" in freeze and not re.search(r"^(torch|onnx|safetensors)==", freeze, re.M)

    data = _data_spec(tmp_path)
    run = subprocess.run([str(env_dir / "bin" / "fedpara-infer"), str(model), "--data", data,
                          "--runs", "20"], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert re.search(r"# accuracy \d+\.\d+% on \d+ samples", run.stdout), run.stdout
    assert re.search(r"# batch 1: p50 \d+\.\d+ ms, p95 \d+\.\d+ ms", run.stdout), run.stdout
    assert "samples/s" in run.stdout

    # the full CLI's `fedpara infer` runs there too (only the infer command is loaded)
    full = subprocess.run([str(env_dir / "bin" / "fedpara"), "infer", str(model), "--data", data, "--runs", "20"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert full.returncode == 0, full.stderr
    assert re.search(r"# accuracy \d+\.\d+% on \d+ samples", full.stdout), full.stdout

    # a data spec the numpy reader cannot serve says what to do instead of a traceback
    bad = subprocess.run([str(env_dir / "bin" / "fedpara-infer"), str(model), "--data", "cifar10"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "needs torch" in bad.stderr and "Traceback" not in bad.stderr
