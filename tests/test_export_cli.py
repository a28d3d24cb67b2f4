"""``fedpara export`` / ``fedpara infer`` through the real CLI entry point (in process)."""
import json

import numpy as np
import pytest

import fedpara
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.runtime.cli import main

DATA = "synthetic,shape=1x28x28,n=256"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A pFedPara client state dir exported with --int8 once for the module."""
    state = tmp_path_factory.mktemp("client")
    spec = ModelSpec(model="cnn28", scheme="pfedpara", ratio=0.5)
    model = spec.build()
    save_checkpoint(state / "global.safetensors", fedpara.global_state(model), spec, round=5)
    save_checkpoint(state / "local.safetensors", fedpara.local_state(model), spec, client=2)
    out = state / "onnx" / "cnn28.onnx"
    rc = main(["export", str(state), "--out", str(out), "--int8", "--data", DATA, "--json"])
    return state, out, rc


def test_export_json_report(exported, capsys):
    state, out, rc = exported
    assert rc == 0
    assert out.is_file() and (out.parent / "cnn28.int8.onnx").is_file()


def test_export_text_report_default_out(tmp_path, capsys):
    spec = ModelSpec(model="mlp", scheme="lowrank", ratio=0.2)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "round-0003.safetensors",
                    fedpara.global_state(spec.build()), spec, round=3, accuracy=0.5)
    assert main(["export", str(tmp_path / "run"), "--data", DATA]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "run" / "model.onnx").is_file()
    assert "mlp scheme=lowrank ratio=0.2 round=3" in text and "same predictions" in text
    assert "accuracy torch" in text


def test_infer_accuracy_and_latency(exported, capsys):
    _, out, _ = exported
    capsys.readouterr()
    assert main(["infer", str(out.parent / "cnn28.int8.onnx"), "--data", DATA, "--runs", "10",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["samples"] == 64
    assert res["metadata"]["scheme"] == "pfedpara" and res["metadata"]["round"] == "5"
    assert "int8" in res["metadata"]["quantization"]
    assert res["batch1"]["batch"] == 1 and res["batch64"]["batch"] == 64
    assert res["batch1"]["p95_ms"] >= res["batch1"]["p50_ms"] > 0


def test_infer_predictions_for_unlabelled_npy(exported, tmp_path, capsys):
    _, out, _ = exported
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    capsys.readouterr()
    assert main(["infer", str(out), "--data", str(tmp_path / "x.npy"), "--runs", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    preds = [int(s) for s in lines if not s.startswith("#")]
    assert len(preds) == 5 and all(0 <= p < 10 for p in preds)
    assert any("batch 1: p50" in s for s in lines) and any("samples/s" in s for s in lines)


def test_infer_wrong_input_shape(exported, tmp_path, capsys):
    _, out, _ = exported
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    assert main(["infer", str(out), "--data", str(tmp_path / "x.npy")]) == 2
    assert "samples have shape (3, 32, 32)" in capsys.readouterr().err


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_provider_is_a_clear_message(exported, provider, monkeypatch, capsys):
    import export.onnx_model
    monkeypatch.setattr(export.onnx_model.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    _, out, _ = exported
    assert main(["infer", str(out), "--data", DATA, "--provider", provider]) == 2
    err = capsys.readouterr().err
    assert f"provider {provider!r}" in err and "not available" in err and "onnxruntime-gpu" in err
    assert "Traceback" not in err


def test_export_errors_are_clear(tmp_path, capsys):
    spec = ModelSpec(model="mlp", scheme="fedpara", ratio=0.2)
    ckpt = save_checkpoint(tmp_path / "c.safetensors", fedpara.global_state(spec.build()), spec)
    assert main(["export", str(ckpt), "--int8"]) == 2
    assert "--int8 needs --data" in capsys.readouterr().err
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0x01
    ckpt.write_bytes(bytes(data))
    assert main(["export", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "fedpara export: error:" in err and "corrupt" in err
    assert main(["infer", str(tmp_path / "none.onnx"), "--data", DATA]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert main(["infer", str(tmp_path / "bad.onnx"), "--data", DATA]) == 2
    assert "onnxruntime cannot load" in capsys.readouterr().err
