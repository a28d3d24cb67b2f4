"""Models fit their data: vgg16 and cnn28 take input channels and size from the data spec.

vgg16 trains on Fashion-MNIST's 1x28x28 as well as on 3x32x32, where it is still the paper's model
(Table 5 sizes, exact counts as built before input shapes existed); cnn28 on 1x28x28 builds
bit-identically as before (same parameters in the same order, same initial draws).
"""
import pytest
import torch
import torch.nn.functional as F

import fedpara
from fedpara import models
from fedpara.data.spec import parse_data_spec
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import state_digest

torch.set_num_threads(1)

# vgg16 parameter counts at gamma 0.1 ... 0.9 and dense, built at fca535b (before input shapes):
# the paper's Table 5 (1.55M ... 12.92M, dense 15.25M), exactly
VGG16_COUNTS = {0.1: 1545442, 0.2: 2325148, 0.3: 3305162, 0.4: 4439316, 0.5: 5790990, 0.6: 7331006,
                0.7: 9001560, 0.8: 10894786, 0.9: 12916962}
VGG16_DENSE = 15253578
# state_digest(ModelSpec(model, scheme=scheme).build(0).state_dict())[:16] at fca535b
BUILT_BEFORE = {("cnn28", "fedpara"): "fb75aa0fbfde11dc", ("cnn28", "dense"): "d7c0df62f29d4990",
                ("vgg16", "fedpara"): "0eafe8dc58c02875"}


def _train_step(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """One SGD step on a batch of 4; the loss after it (finite, and the weights moved)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model.train()(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return loss.item()


@pytest.mark.parametrize("data", ["fashion-mnist", "cifar10", "synthetic,shape=3x20x24"])
@pytest.mark.parametrize("scheme", ["fedpara", "dense"])
def test_vgg16_trains_a_step_on_the_data_specs_shape(data, scheme):
    shape = parse_data_spec(data).input_shape
    model = ModelSpec("vgg16", scheme=scheme, input_shape=shape).build(0)
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert torch.isfinite(torch.tensor(_train_step(model, shape)))


@pytest.mark.parametrize("gamma", sorted(VGG16_COUNTS))
def test_vgg16_on_3x32x32_keeps_the_papers_exact_sizes(gamma):
    for shape in (None, (3, 32, 32)):
        n = fedpara.count_params(ModelSpec("vgg16", ratio=gamma, input_shape=shape).build(0))
        assert n == VGG16_COUNTS[gamma]
    assert fedpara.count_params(models.build("vgg16", input_shape=(3, 32, 32))) == VGG16_DENSE


def test_vgg16_on_fashion_mnist_rounds_odd_sides_up_and_keeps_the_classifier():
    model = models.build("vgg16", input_shape=(1, 28, 28))
    assert model.features[0].in_channels == 1 and model.classifier[0].in_features == 512  # 28>14>7>4>2>1
    pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert [p.ceil_mode for p in pools] == [False, False, True, False, False]
    assert not any(m.ceil_mode for m in models.build("vgg16").features if isinstance(m, torch.nn.MaxPool2d))


@pytest.mark.parametrize(("model", "scheme"), sorted(BUILT_BEFORE))
def test_models_on_their_own_data_build_as_before(model, scheme):
    own = models.INPUT_SHAPES[model]
    for shape in (None, own):
        spec = ModelSpec(model, scheme=scheme, input_shape=shape)
        assert spec.input_shape is None and spec.sample_shape == own
        assert "input_shape" not in spec.to_dict()  # tasks and checkpoints read as before
        assert state_digest(spec.build(0).state_dict())[:16] == BUILT_BEFORE[model, scheme]


def test_cnn28_takes_channels_and_size():
    spec = ModelSpec("cnn28", input_shape=(3, 32, 32))
    model = spec.build(0)
    assert model.features[0].in_channels == 3 and model.classifier[0].in_features == 32 * 8 * 8
    assert _train_step(model, (3, 32, 32)) > 0
    assert spec.to_dict()["input_shape"] == [3, 32, 32]
    assert ModelSpec.from_dict(spec.to_dict()) == spec  # JSON lists come back as the same spec


def test_mlp_input_features_follow_the_sample_size():
    model = models.build("mlp", input_shape=(3, 8, 8))
    assert model.fc1.in_features == 192 and model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(("model", "shape", "match"), [
    ("vgg16", (28, 28), r"input_shape: vgg16 takes images \(C, H, W\)"),
    ("cnn28", (1, 2, 2), "input_shape: cnn28 needs images of at least 4x4"),
    ("char_lstm", (1, 28, 28), "input_shape: char_lstm takes 1-D windows"),
    ("mlp", (0, 28), "input_shape must be positive ints"),
    ("mlp", "1x28x28", "input_shape must be a list of ints"),
    ("vgg16", (3, 4096, 4096), "at most 4 dims and 1048576 values per sample"),
])
def test_a_shape_a_model_cannot_take_names_the_field(model, shape, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(model, input_shape=shape)


def test_example_input_follows_the_spec():
    spec = ModelSpec("vgg16", input_shape=(1, 28, 28))
    x = models.example_input(spec.model, 3, spec.num_classes, spec.input_shape)
    assert x.shape == (3, 1, 28, 28) and spec.build(0)(x).shape == (3, 10)
    assert models.example_input("char_lstm", 2, 40).shape == (2, 80)


def test_data_specs_name_their_sample_shape():
    assert parse_data_spec("fashion-mnist").input_shape == (1, 28, 28)
    assert parse_data_spec("cifar100,label=coarse").input_shape == (3, 32, 32)
    assert parse_data_spec("synthetic,shape=2x9x9").input_shape == (2, 9, 9)
    assert parse_data_spec("shakespeare").input_shape == (80,)


def test_check_input_shape_is_the_specs_own_check():
    assert models.check_input_shape("vgg16", [1, 28, 28]) == (1, 28, 28)
    with pytest.raises(ValueError, match="model: must be one of"):
        models.check_input_shape("resnet", (3, 32, 32))
    with pytest.raises(ValueError, match="input_shape: char_lstm takes 1-D windows"):
        models.check_input_shape("char_lstm", (1, 28, 28))
