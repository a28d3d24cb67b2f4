"""``fedpara export RUN_DIR --int8`` without ``--data``: the run's recorded test_data is used."""
import json

import fedpara
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.runtime.cli import main

DATA = "synthetic,shape=1x28x28,n=256"


def _run_dir(tmp_path, config):
    spec = ModelSpec(model="mlp", scheme="fedpara", ratio=0.2)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "round-0002.safetensors", fedpara.global_state(spec.build()),
                    spec, round=2, accuracy=0.5)
    (run / "summary.json").write_text(json.dumps({"spec": spec.to_dict(), "final_accuracy": 0.5}))
    if config is not None:
        (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return run


def test_int8_without_data_uses_the_runs_test_data(tmp_path, capsys):
    run = _run_dir(tmp_path, {"run_id": "r", "test_data": DATA})
    assert main(["export", str(run), "--int8", "--calibration", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (run / "model.int8.onnx").is_file()
    assert report["parity_data"]["samples"] == 64  # synthetic n=256: the test split has 64
    assert report["int8_accuracy"] is not None


def test_text_report_names_the_recorded_data(tmp_path, capsys):
    run = _run_dir(tmp_path, {"test_data": DATA})
    assert main(["export", str(run)]) == 0
    assert f"parity ({DATA}, 64 samples)" in capsys.readouterr().out


def test_explicit_data_wins_over_the_recorded_one(tmp_path, capsys):
    run = _run_dir(tmp_path, {"test_data": "fashion-mnist,path=/nonexistent"})
    assert main(["export", str(run), "--data", DATA, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parity_data"]["samples"] == 64


def test_without_a_recorded_spec_int8_still_needs_data(tmp_path, capsys):
    run = _run_dir(tmp_path, None)
    assert main(["export", str(run), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "--int8 needs --data" in err and "recording its test_data" in err
    (run / "config.json").write_text("{not json")
    assert main(["export", str(run), "--int8"]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps({"test_data": 3}))
    assert main(["export", str(run), "--int8"]) == 2
    assert "test_data must be a data spec string" in capsys.readouterr().err
