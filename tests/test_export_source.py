"""export.load_source: run directory, checkpoint, client state dir (pFedPara global + local), and
clear errors for corrupt, mismatched or incomplete sources. No ONNX export here (fast)."""
import json

import pytest
import torch

import fedpara
from export import latest_checkpoint, load_source
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def run_dir(tmp_path):
    spec = ModelSpec(model="mlp", scheme="fedpara", ratio=0.2)
    models = {}
    for r in (2, 9, 10):
        models[r] = spec.build(seed=r)
        save_checkpoint(tmp_path / "checkpoints" / f"round-{r:04d}.safetensors",
                        fedpara.global_state(models[r]), spec, round=r, accuracy=r / 100)
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "summary.json").write_text(json.dumps({"final_accuracy": 0.1, "spec": spec.to_dict()}))
    return tmp_path, spec, models


def test_run_dir_takes_the_latest_round(run_dir):
    path, spec, models = run_dir
    assert latest_checkpoint(path).name == "round-0010.safetensors"
    model, got_spec, info = load_source(path)
    assert got_spec == spec and not model.training
    assert _same(model, models[10])
    assert (info["round"], info["accuracy"], info["run_dir"]) == (10, 0.1, str(path))


def test_run_dir_ignores_a_checkpoint_that_metrics_never_recorded(run_dir):
    """Crash between checkpoint and metrics line: round 10 will be redone by --resume."""
    path, _, models = run_dir
    (path / "metrics.jsonl").write_text(json.dumps({"round": 2}) + "\n" + json.dumps({"round": 9}) + "\n{\"rou")
    assert latest_checkpoint(path).name == "round-0009.safetensors"
    model, _, info = load_source(path)
    assert _same(model, models[9]) and info["round"] == 9


def test_run_dir_summary_spec_mismatch(run_dir):
    path, spec, _ = run_dir
    (path / "summary.json").write_text(json.dumps({"spec": {**spec.to_dict(), "ratio": 0.5}}))
    with pytest.raises(ValueError, match="run summary says"):
        load_source(path)
    (path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="summary.json is not valid JSON"):
        load_source(path)


def test_run_dir_without_checkpoints(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_source(tmp_path)


def test_checkpoint_file(run_dir):
    path, spec, models = run_dir
    model, got, info = load_source(path / "checkpoints" / "round-0009.safetensors")
    assert got == spec and _same(model, models[9]) and info["round"] == 9


def test_corrupt_checkpoint_names_the_problem(run_dir):
    path, _, _ = run_dir
    ckpt = path / "checkpoints" / "round-0010.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor bytes
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest mismatch, the file is corrupt"):
        load_source(path)
    ckpt.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_source(ckpt)


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    state = fedpara.global_state(ModelSpec(model="cnn28", scheme="fedpara", ratio=0.9).build())
    wrong = ModelSpec(model="cnn28", scheme="fedpara", ratio=0.1)
    save_checkpoint(tmp_path / "c.safetensors", state, wrong)
    with pytest.raises(ValueError, match=r"does not match its model spec.*ratio=0\.1.*shapes differ"):
        load_source(tmp_path / "c.safetensors")
    save_checkpoint(tmp_path / "d.safetensors", state, ModelSpec(model="cnn28", scheme="lowrank", ratio=0.9))
    with pytest.raises(ValueError, match="keys differ"):
        load_source(tmp_path / "d.safetensors")


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither a run directory"):
        load_source(tmp_path)


def _client_dir(tmp_path, spec, model, local=True):
    save_checkpoint(tmp_path / "global.safetensors", fedpara.global_state(model), spec, round=12)
    if local:
        save_checkpoint(tmp_path / "local.safetensors", fedpara.local_state(model), spec, client=4,
                        accuracy=0.9)
    return tmp_path


def test_client_state_dir_merges_global_and_local(tmp_path):
    spec = ModelSpec(model="cnn28", scheme="pfedpara", ratio=0.5)
    trained = spec.build(seed=7)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model, got, info = load_source(_client_dir(tmp_path, spec, trained))
    assert got == spec and _same(model, trained)
    assert (info["round"], info["client"], info["accuracy"], info["personalised"]) == (12, 4, 0.9, True)
    x = fedpara.models.example_input("cnn28", 4)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))


def test_client_state_dir_for_fedpara_needs_no_local(tmp_path):
    spec = ModelSpec(model="mlp", scheme="fedpara", ratio=0.5)
    trained = spec.build(seed=7)
    model, _, info = load_source(_client_dir(tmp_path, spec, trained, local=False))
    assert _same(model, trained) and info["round"] == 12


def test_pfedpara_without_local_half_is_an_error(tmp_path):
    spec = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.5)
    trained = spec.build(seed=7)
    with pytest.raises(FileNotFoundError, match="local.safetensors"):
        load_source(_client_dir(tmp_path, spec, trained, local=False))
    with pytest.raises(ValueError, match="only the global half"):
        load_source(tmp_path / "global.safetensors")


def test_pfedpara_full_state_checkpoint(tmp_path):
    spec = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.5)
    trained = spec.build(seed=7)
    save_checkpoint(tmp_path / "full.safetensors", trained.state_dict(), spec)
    model, _, _ = load_source(tmp_path / "full.safetensors")
    assert _same(model, trained)


def test_client_local_written_for_another_spec(tmp_path):
    spec = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.5)
    trained = spec.build(seed=7)
    _client_dir(tmp_path, spec, trained)
    other = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.2)
    save_checkpoint(tmp_path / "local.safetensors", fedpara.local_state(other.build()), other)
    with pytest.raises(ValueError, match="local.safetensors was written for"):
        load_source(tmp_path)
