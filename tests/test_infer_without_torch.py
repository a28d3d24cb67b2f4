"""``fedpara infer`` and ``fedpara-infer`` with torch made unimportable (a meta-path blocker in a
fresh interpreter): the IDX / Fashion-MNIST reader, the data-spec parser and the row selection
import and give the rows the torch loaders give, and both commands run an exported model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedpara
from fedpara.data import load_rows
from fedpara.data.idx import write_idx
from fedpara.data.rows import which_for
from fedpara.data.spec import parse_data_spec
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.runtime.cli import main

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

BLOCK_TORCH = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxscript"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _NoTorch())
'''


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code, *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    """Written files in Fashion-MNIST's layout (small, so every selection below is quick)."""
    root = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(3)
    for prefix, n in (("train", 600), ("t10k", 200)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("model")
    spec = ModelSpec(model="cnn28", scheme="fedpara", ratio=0.1)
    ckpt = save_checkpoint(tmp / "c.safetensors", fedpara.global_state(spec.build()), spec, round=1)
    assert main(["export", str(ckpt), "--out", str(tmp / "cnn28.onnx")]) == 0
    return tmp / "cnn28.onnx"


def test_the_blocker_blocks_torch():
    r = _run("import torch")
    assert r.returncode != 0 and "blocked by the test" in r.stderr


def test_readers_parser_and_rows_import_without_torch_and_match_the_loaders(fmnist, tmp_path):
    cases = [("", "auto", None), (",limit=50,seed=4", "test", None), (",val=0.2,split=val,limit=40", "auto", None),
             (",partition=dirichlet:0.5,clients=4,index=2,seed=1", "train", None),
             (",partition=iid,clients=4,index=1,test_size=30", "auto", "pfedpara")]
    specs = [(f"fashion-mnist,path={fmnist}{extra}", split, scheme) for extra, split, scheme in cases]
    code = '''
import json, sys
import numpy as np
from fedpara.data.idx import read_idx, IdxFile
from fedpara.data.fashion_mnist import find_fashion_mnist, read_split_uint8
from fedpara.data.spec import parse_data_spec
from export.infer import load_inputs
out = {}
for i, (text, split, scheme) in enumerate(json.loads(sys.argv[1])):
    assert parse_data_spec(text).name == "fashion-mnist"
    x, y = load_inputs(text, scheme, split)
    out[f"x{i}"], out[f"y{i}"] = x, y
np.savez(sys.argv[2], **out)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
assert not bad, bad
'''
    r = _run(code, json.dumps(specs), str(tmp_path / "rows.npz"))
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "rows.npz")
    for i, (text, split, scheme) in enumerate(specs):
        spec = parse_data_spec(text)
        x, y = load_rows(spec, which_for(split, scheme, spec)).tensors
        assert len(y) > 0, text
        np.testing.assert_array_equal(got[f"x{i}"], x.numpy(), err_msg=text)
        np.testing.assert_array_equal(got[f"y{i}"], y.numpy(), err_msg=text)


@pytest.mark.parametrize("command", ["fedpara infer", "fedpara-infer"])
def test_both_infer_commands_run_without_torch(fmnist, model, command):
    call = ("from fedpara.runtime.cli import main; args = ['infer'] + sys.argv[1:]" if command == "fedpara infer"
            else "from export.infer import main; args = sys.argv[1:]")
    code = call + '''
code = main(args)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
assert not bad, bad
sys.exit(code)
'''
    r = _run(code, str(model), "--data", f"fashion-mnist,path={fmnist},limit=100", "--runs", "5", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["samples"] == 100 and 0.0 <= result["accuracy"] <= 1.0
    assert result["metadata"]["model"] == "cnn28" and result["batch1"]["runs"] >= 3

    # a data set only the torch loaders read: a clear error, exit 2, no traceback
    bad = _run(code, str(model), "--data", "cifar10", "--runs", "5")
    assert bad.returncode == 2 and "needs torch" in bad.stderr and "Traceback" not in bad.stderr


def test_the_lazy_packages_load_torch_only_when_a_torch_name_is_used():
    code = '''
import sys
import fedpara, fedpara.data
assert "torch" not in sys.modules and fedpara.__version__
from fedpara.data import parse_data_spec, read_idx, find_fashion_mnist, seeded_subset
assert "torch" not in sys.modules
import fedpara.models  # imports fedpara.conversion: the package's ``convert`` stays the function
assert "torch" in sys.modules
assert callable(fedpara.convert) and fedpara.convert.__module__ == "fedpara.conversion"
assert fedpara.models.build and fedpara.kernels.SCHEMES and "convert" in dir(fedpara)
from fedpara import compose, count_params, FedParaLinear
from fedpara.data import load_client_data, partition
assert partition.__name__ == "fedpara.data.partition" and callable(partition.partition)
try:
    fedpara.nope
except AttributeError as exc:
    assert "nope" in str(exc)
else:
    raise AssertionError("fedpara.nope")
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
