"""export/: compose -> ONNX (dynamo) -> onnxruntime parity for every reference model and scheme,
the metadata, the dynamic batch, and int8 on a briefly trained cnn28 (real Fashion-MNIST)."""
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import fashion_mnist_available, needs_fmnist

import fedpara
from export import (
    OnnxModel,
    check_parity,
    export_model,
    export_onnx,
    quantize_int8,
    read_metadata,
)
from export.pipeline import torch_logits
from fedpara import models
from fedpara.data import load_client_data, load_test_data
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import state_digest
from fedpara.training import train_epochs

MODELS = ("cnn28", "mlp", "vgg16", "char_lstm")
SCHEMES = ("dense", "fedpara", "lowrank", "pfedpara")
INFO = {"round": 7, "accuracy": 0.8125, "client": 3}


HAVE_FMNIST = fashion_mnist_available()


def _spec(name: str, scheme: str) -> ModelSpec:
    return ModelSpec(model=name, num_classes=80 if name == "char_lstm" else 10, scheme=scheme,
                     ratio=0.3 if scheme != "dense" else 0.1)


def _nontrivial(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb constant-initialised parameters (norm affine, zero biases) so they must transfer."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and float(p.std()) == 0.0:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def test_split():
    """name -> (x, y): the Fashion-MNIST test split (subset) where it applies, else synthetic."""
    torch.manual_seed(1)
    if HAVE_FMNIST:
        fm = load_test_data("fashion-mnist,limit=512").tensors
    else:
        fm = load_test_data("synthetic,shape=1x28x28,n=2048").tensors
    vgg = load_test_data("synthetic,shape=3x32x32,n=256").tensors
    chars = (torch.randint(0, 80, (96, 80)), torch.randint(0, 80, (96,)))
    return {"cnn28": fm, "mlp": fm, "vgg16": vgg, "char_lstm": chars}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
def test_parity_metadata_dynamic_batch(name, scheme, tmp_path, test_split):
    spec = _spec(name, scheme)
    model = _nontrivial(spec.build())
    x, y = test_split[name]
    report = export_model(model, spec, tmp_path / "m.onnx", info=INFO, eval_data=(x, y), latency_runs=5)
    # parity: random batch 1 and 64 (dynamic batch), and the test split
    assert report.parity_random.ok, report.parity_random
    pd = report.parity_data
    assert pd.max_abs <= 1e-4 and pd.same_predictions, pd
    assert pd.torch_accuracy == pd.onnx_accuracy
    # the same assertion for the composed torch model
    assert np.abs(torch_logits(fedpara.compose(model), x) - torch_logits(model, x)).max() <= 1e-4
    # one self-contained file, checked, symbolic batch dimension
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    proto = onnx.load(str(report.onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    # metadata
    om = OnnxModel(report.onnx)
    meta = om.metadata
    assert meta == read_metadata(report.onnx)
    assert (meta["scheme"], float(meta["ratio"]), meta["model"]) == (scheme, spec.ratio, name)
    assert (meta["round"], float(meta["accuracy"])) == ("7", 0.8125)
    assert json.loads(meta["info"])["client"] == 3
    assert om.spec == spec
    assert meta["factor_digest"] == state_digest(model.state_dict())
    assert meta["digest_of"] == "factors"


def test_export_of_composed_model_and_opset(tmp_path):
    spec = _spec("mlp", "fedpara")
    model = _nontrivial(spec.build())
    plain = fedpara.compose(model)
    path = export_onnx(plain, spec, tmp_path / "c.onnx", opset=18)
    om = OnnxModel(path)
    assert om.metadata["digest_of"] == "composed"
    assert om.metadata["factor_digest"] == state_digest(plain.state_dict())
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [18]
    x = models.example_input("mlp", 64)
    assert check_parity(model, om, x).ok
    assert om.predict(x[:1].numpy()).shape == (1, 10)
    model.train()  # the caller's model keeps its mode (export works on a composed copy)
    export_onnx(model, spec, tmp_path / "f.onnx")
    assert model.training and OnnxModel(tmp_path / "f.onnx").metadata["digest_of"] == "factors"


def test_export_rejects_model_that_does_not_match_spec(tmp_path):
    model = _spec("cnn28", "fedpara").build()
    with pytest.raises(ValueError, match="does not match spec"):
        export_onnx(model, ModelSpec(model="cnn28", scheme="fedpara", ratio=0.9), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, _spec("cnn28", "fedpara"), tmp_path / "x.onnx", opset=9)
    assert not (tmp_path / "x.onnx").exists()


def _train_cnn28() -> tuple[torch.nn.Module, ModelSpec, torch.Tensor]:
    """cnn28 (FedPara 0.5) after 2 epochs on 12k Fashion-MNIST images (~375 SGD steps)."""
    spec = ModelSpec(model="cnn28", scheme="fedpara", ratio=0.5)
    torch.manual_seed(0)
    model = spec.build()
    train, _ = load_client_data("fashion-mnist,limit=12000,seed=0")
    train_epochs(model, train, epochs=2, batch_size=64, lr=0.05, momentum=0.9, seed=0)
    x = train.tensors[0]
    calib = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]]
    return model.eval(), spec, calib


@needs_fmnist
def test_int8_trained_cnn28_fashion_mnist(tmp_path):
    model, spec, calib = _train_cnn28()
    test = load_test_data("fashion-mnist,limit=5000").tensors
    report = export_model(model, spec, tmp_path / "cnn28.onnx", info={"round": 1}, eval_data=test,
                          calibration=calib, int8=True, latency_runs=20)
    assert report.ok
    assert report.parity_data.onnx_accuracy == report.parity_data.torch_accuracy >= 0.80
    assert report.int8_drop_pp <= 0.5, report.to_dict()
    assert report.size_bytes / report.int8_size_bytes >= 3.5
    q = OnnxModel(report.int8)
    assert q.metadata["factor_digest"] == state_digest(model.state_dict())
    assert "QDQ" in q.metadata["quantization"] and "per-channel" in q.metadata["quantization"]
    ops = {n.op_type for n in onnx.load(str(report.int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for b in (1, 64):  # dynamic batch survives quantisation
        assert q.predict(test[0][:b].numpy()).shape == (b, 10)


def test_quantize_int8_inputs(tmp_path):
    spec = _spec("mlp", "lowrank")
    path = export_onnx(spec.build(), spec, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(path, tmp_path / "q.onnx", np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="overwrite"):
        quantize_int8(path, path, torch.randn(8, 1, 28, 28))
    with pytest.raises(FileNotFoundError):
        quantize_int8(tmp_path / "nope.onnx", tmp_path / "q.onnx", torch.randn(8, 1, 28, 28))
    with pytest.raises(ValueError, match="calibration"):
        export_model(spec.build(), spec, tmp_path / "m2.onnx", int8=True)
    q = quantize_int8(path, tmp_path / "q.onnx", torch.randn(64, 1, 28, 28), per_channel=False)
    assert "per-tensor" in OnnxModel(q).metadata["quantization"]


def test_int8_char_lstm_runs_lstm_stays_fp32(tmp_path):
    """Static QDQ has no LSTM rule: the LSTM stays fp32, the model still runs and mostly agrees."""
    spec = _spec("char_lstm", "fedpara")
    model = spec.build().eval()
    path = export_onnx(model, spec, tmp_path / "c.onnx")
    x = models.example_input("char_lstm", 128, 80)
    q = OnnxModel(quantize_int8(path, tmp_path / "c.int8.onnx", x))
    ops = {n.op_type for n in onnx.load(str(q.path)).graph.node}
    assert "LSTM" in ops or "Scan" in ops or "Loop" in ops
    agree = (q.predict(x.numpy()).argmax(1) == torch_logits(model, x).argmax(1)).mean()
    assert agree >= 0.9
