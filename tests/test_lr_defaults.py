"""Per-scheme default learning rates (fedpara/lr.py), the movement measure, and comparable
initialisations of the dense baseline and the factorised schemes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig
from fedpara import kernels
from fedpara.lr import DEFAULT_LR, DELTA_LR, SCHEME_LR, default_lr, lr_table, movement
from fedpara.models import SCHEMES, ModelSpec

torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "repro_results.json"
COMPRESS = RESULTS.with_name("compress_results.json")


def test_every_scheme_has_a_default_and_the_table_is_in_the_help():
    assert set(SCHEME_LR) == set(SCHEMES)
    for scheme in SCHEMES:
        assert default_lr("vgg16", scheme) > 0
    with pytest.raises(ValueError, match="no default lr"):
        default_lr("cnn28", "nope")
    help_text = CoordinatorConfig.__dataclass_fields__["lr"].metadata["help"]
    assert "0 = the default" in help_text and lr_table() in help_text


@pytest.mark.parametrize("model,scheme", sorted(DEFAULT_LR))
def test_coordinator_uses_the_measured_default_unless_given(model, scheme):
    cfg = CoordinatorConfig(insecure=True, model=model, scheme=scheme)
    assert cfg.lr == DEFAULT_LR[(model, scheme)] == default_lr(model, scheme)
    assert CoordinatorConfig(insecure=True, model=model, scheme=scheme, lr=0.123).lr == 0.123


def test_a_delta_coded_wire_gets_the_lr_its_configurations_chose():
    """cnn28's compressed configurations chose half FedPara's lr; a plain wire keeps the other."""
    for wire in ("delta", "lean"):
        cfg = CoordinatorConfig(insecure=True, model="cnn28", scheme="fedpara", wire=wire)
        assert cfg.lr == DELTA_LR[("cnn28", "fedpara")] == DEFAULT_LR[("cnn28", "fedpara")] / 2
        assert CoordinatorConfig(insecure=True, model="cnn28", wire=wire, lr=0.3).lr == 0.3
    assert CoordinatorConfig(insecure=True, model="cnn28", wire="plain").lr == DEFAULT_LR[("cnn28", "fedpara")]
    assert CoordinatorConfig(insecure=True, model="mlp2", wire="lean").lr == DEFAULT_LR[("mlp2", "fedpara")]
    help_text = CoordinatorConfig.__dataclass_fields__["lr"].metadata["help"]
    assert lr_table(delta=True) in help_text and "cnn28/fedpara 0.15" in help_text


@pytest.mark.skipif(not COMPRESS.exists(), reason="no docs/results/compress_results.json")
def test_delta_lrs_are_what_every_compressed_configuration_chose():
    """Measured: on cnn28 (IID) every delta-coded configuration with error feedback (what ``delta``
    and ``lean`` run unless ``error_feedback = false``) chose DELTA_LR on the validation split."""
    sweep = json.loads(COMPRESS.read_text())["sweep"]
    for (model, scheme), lr in DELTA_LR.items():
        chosen = {c: s["chosen_lr"] for c, s in sweep[model].items()
                  if c.startswith("delta-") and not c.endswith("-noef")}
        assert chosen and set(chosen.values()) == {lr}, chosen


def test_schemes_without_their_own_measurement_borrow_the_nearest():
    for model in ("cnn28", "mlp2"):
        if (model, "lowrank") in DEFAULT_LR:
            assert default_lr(model, "pfedpara") == DEFAULT_LR[(model, "lowrank")] / 2
        if (model, "dense") in DEFAULT_LR:
            assert default_lr(model, "fedper") == DEFAULT_LR[(model, "dense")]
    # not measured: the previous single default (mlp2's FedPara 0.4 diverged on mlp in the demo)
    for model, scheme in (("mlp", "fedpara"), ("mlp", "lowrank"), ("vgg16", "fedpara"), ("char_lstm", "dense")):
        assert (model, scheme) not in DEFAULT_LR and default_lr(model, scheme) == 0.1


@pytest.mark.skipif(not RESULTS.exists(), reason="no docs/results/repro_results.json")
def test_defaults_are_the_lrs_the_validation_sweep_chose():
    """Measured, not guessed: every table entry is what bench_repro.py chose on the validation split."""
    results = json.loads(RESULTS.read_text())
    models, personal = results["models"], results["personal_lrs"]
    for (model, scheme), lr in DEFAULT_LR.items():
        if model == "mlp":  # the personalisation setting's lrs
            assert personal[scheme] == lr, (model, scheme)
        else:
            assert models[model]["sweep"][scheme]["chosen_lr"] == lr, (model, scheme)


def test_movement_dense_is_one_and_fedpara_moves_slower_than_lowrank():
    assert movement(ModelSpec("mlp", scheme="dense").build(0)) == 1.0
    fp = movement(ModelSpec("mlp", scheme="fedpara").build(0))
    lr = movement(ModelSpec("mlp", scheme="lowrank").build(0))
    assert 0.3 < fp < 1.0 < lr < 3.0
    assert movement(ModelSpec("mlp", scheme="fedpara").build(0), seed=1) == pytest.approx(fp, rel=0.05)


def test_dense_baseline_starts_at_the_std_the_factorised_layers_compose_to():
    dense = ModelSpec("mlp2", scheme="dense").build(0)
    fedp = ModelSpec("mlp2", scheme="fedpara").build(0)
    for name, fan_in in (("fc1", 784), ("fc2", 512)):
        he = kernels.he_std(fan_in)
        assert dense.get_submodule(name).weight.std().item() == pytest.approx(he, rel=0.03)
        assert fedp.get_submodule(name).weight.std().item() == pytest.approx(he, rel=0.15)
    # a layer that stays dense in both keeps torch's default in both (std 1/sqrt(3 fan_in))
    for m in (dense, fedp):
        assert m.fc3.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)
    # cnn28's first conv stays dense everywhere: identical in the dense and FedPara models
    c_dense, c_fp = ModelSpec("cnn28", scheme="dense").build(0), ModelSpec("cnn28").build(0)
    assert torch.equal(c_dense.features[0].weight, c_fp.features[0].weight)
