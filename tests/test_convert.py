"""convert / compose / global_state / local_state, the rank rule and the reference models."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedpara
from fedpara import models
from fedpara.rank import fedpara_rank_bounds, rank_for_ratio_dims

# Paper Table 5: VGG16 (GroupNorm), 10 classes, sizes in millions
TABLE5 = {0.1: 1.55, 0.2: 2.33, 0.3: 3.31, 0.4: 4.45, 0.5: 5.79, 0.6: 7.33, 0.7: 9.01, 0.8: 10.90,
          0.9: 12.92}


@pytest.mark.parametrize("gamma,millions", sorted(TABLE5.items()))
def test_table5_vgg16_sizes(gamma, millions):
    n = fedpara.count_params(fedpara.convert(models.build("vgg16", num_classes=10), ratio=gamma))
    assert abs(n / 1e6 - millions) / millions <= 0.005, n


def test_table5_exact_first_entry_and_originals():
    n = fedpara.count_params(fedpara.convert(models.build("vgg16"), ratio=0.1))
    assert abs(n - 1.545e6) / 1.545e6 <= 0.005
    assert abs(fedpara.count_params(models.build("vgg16")) - 15.25e6) / 15.25e6 <= 0.005
    assert abs(fedpara.count_params(models.build("vgg16", num_classes=100)) - 15.30e6) / 15.30e6 <= 0.005
    n100 = fedpara.count_params(fedpara.convert(models.build("vgg16", num_classes=100), ratio=0.4))
    assert abs(n100 - 4.50e6) / 4.50e6 <= 0.01


def test_rank_rule_as_written():
    conv = nn.Conv2d(256, 512, 3)
    r_min, r_max = fedpara_rank_bounds(512, 256, (3, 3))
    assert r_min == min(math.ceil(math.sqrt(512)), math.ceil(math.sqrt(256))) == 16
    root = (-(768) + math.sqrt(768 ** 2 + 2 * 81 * 512 * 256)) / 18
    assert r_max == math.floor(root)
    assert 2 * (9 * r_max ** 2 + 768 * r_max) <= 512 * 256 * 9 < 2 * (9 * (r_max + 1) ** 2 + 768 * (r_max + 1))
    for g in (0.0, 0.1, 0.5, 1.0):
        assert fedpara.rank_for_ratio(conv, g) == round((1 - g) * r_min + g * r_max)
    fc = nn.Linear(300, 200)
    assert fedpara_rank_bounds(200, 300)[1] == (200 * 300) // (2 * 500)
    # capped by min(O, I): the 3-channel input conv
    assert fedpara.rank_for_ratio(nn.Conv2d(3, 64, 3), 0.9) == 3
    assert fedpara.rank_for_ratio(fc, 1.0) == 60


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "0.3", True, float("nan")])
def test_rank_rule_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        fedpara.rank_for_ratio(nn.Linear(10, 10), ratio)


def test_rank_for_ratio_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        fedpara.rank_for_ratio(nn.Embedding(3, 4), 0.5)


def test_lowrank_matches_fedpara_budget():
    for dims in [(512, 512, (3, 3)), (256, 784, (1, 1)), (64, 3, (3, 3))]:
        r = rank_for_ratio_dims(*dims, 0.3)
        lr = rank_for_ratio_dims(*dims, 0.3, scheme="lowrank")
        matrix = dims[2] == (1, 1)
        form = "matrix" if matrix else "tensor"
        ker = () if matrix else dims[2]
        budget = fedpara.kernels.param_count("fedpara", form, dims[0], dims[1], r, ker)
        assert fedpara.kernels.param_count("lowrank", form, dims[0], dims[1], lr, ker) <= budget


def test_convert_copies_every_hyperparameter_and_keeps_classifier_dense():
    model = fedpara.convert(models.build("vgg16"), ratio=0.2)
    convs = [m for m in model.features if isinstance(m, fedpara.FedParaConv2d)]
    assert len(convs) == 13
    assert all(c.padding == (1, 1) and c.kernel_size == (3, 3) for c in convs)
    assert all(type(m) is nn.Linear for m in model.classifier if isinstance(m, (nn.Linear, fedpara.FactorisedLayer)))


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("scheme", ["fedpara", "lowrank", "pfedpara"])
def test_compose_parity_every_model(name, scheme):
    model = fedpara.convert(models.build(name), ratio=0.3, scheme=scheme).eval()
    composed = fedpara.compose(model)
    x = models.example_input(name, 3)
    with torch.no_grad():
        assert (model(x) - composed(x)).abs().max().item() <= 1e-5
    for m in composed.modules():
        assert not isinstance(m, (fedpara.FactorisedLayer, fedpara.FactorisedLSTM))
    assert not any(k.split(".")[-1] in {"x1", "y1", "x2", "y2", "t1", "t2"} for k in composed.state_dict())
    assert fedpara.count_params(composed) == fedpara.count_params(models.build(name))
    # the source model is untouched and still factorised
    assert any(isinstance(m, fedpara.FactorisedLayer) for m in model.modules())


def test_compose_rejects_non_finite():
    model = fedpara.convert(models.build("mlp"), ratio=0.2)
    with torch.no_grad():
        model.fc1.x1[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*fc1"):
        fedpara.compose(model)


def test_gradients_reach_every_factor_in_models():
    for name in ("cnn28", "char_lstm"):
        model = fedpara.convert(models.build(name), ratio=0.2)
        model(models.example_input(name, 2)).sum().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, pname


class BasicBlock(nn.Module):
    """A ResNet basic block the library has never seen."""

    def __init__(self, c_in=16, c_out=32, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.fc = nn.Linear(c_out, 10)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("scheme", ["fedpara", "lowrank", "pfedpara"])
def test_convert_unseen_resnet_block(scheme):
    block = fedpara.convert(BasicBlock(), ratio=0.5, scheme=scheme)
    assert isinstance(block.conv1, fedpara.FactorisedLayer) and block.conv1.stride == (2, 2)
    assert isinstance(block.shortcut[0], fedpara.FactorisedLayer) and block.shortcut[0].form == "matrix"
    x = torch.randn(4, 16, 8, 8)
    block.train()
    block(x).sum().backward()  # batch-norm statistics move
    block.eval()
    composed = fedpara.compose(block)
    assert (block(x) - composed(x)).abs().max().item() <= 1e-5
    # BatchNorm buffers travel with the global state
    assert "bn1.running_mean" in fedpara.global_state(block)


def test_convert_explicit_rank_map_skip_and_targets():
    model = fedpara.convert(BasicBlock(), ratio=0.5, rank={"conv2": 3}, skip=["fc"])
    assert model.conv2.rank == 3 and model.conv1.rank == fedpara.rank_for_ratio(nn.Conv2d(16, 32, 3), 0.5)
    assert type(model.fc) is nn.Linear
    only = fedpara.convert(BasicBlock(), rank=4, targets=["conv1"])
    assert only.conv1.rank == 4 and type(only.conv2) is nn.Conv2d
    capped = fedpara.convert(nn.Sequential(nn.Conv2d(3, 8, 3)), rank=99)
    assert capped[0].rank == 3
    with pytest.raises(TypeError, match="supported: Linear, Conv2d, LSTM"):
        fedpara.convert(BasicBlock(), rank=2, targets=["bn1"])
    with pytest.raises(ValueError, match="matches no module"):
        fedpara.convert(BasicBlock(), rank=2, targets=["nope"])
    with pytest.raises(ValueError, match="no rank for layer 'conv1'"):
        fedpara.convert(BasicBlock(), rank={"conv2": 3})
    with pytest.raises(ValueError, match="scheme"):
        fedpara.convert(BasicBlock(), ratio=0.5, scheme="lora")
    with pytest.raises(ValueError, match="ratio"):
        fedpara.convert(BasicBlock())
    with pytest.raises(ValueError, match="rank for layer"):
        fedpara.convert(BasicBlock(), rank=0)


def test_pfedpara_global_local_split():
    model = fedpara.convert(models.build("mlp"), ratio=0.5, scheme="pfedpara")
    g, loc = fedpara.global_state(model), fedpara.local_state(model)
    assert set(g) == {"fc1.x1", "fc1.y1", "fc2.x1", "fc2.y1"}
    assert set(loc) == {"fc1.x2", "fc1.y2", "fc1.bias", "fc2.x2", "fc2.y2", "fc2.bias"}
    assert set(g) | set(loc) == set(model.state_dict()) and not set(g) & set(loc)
    # for FedPara and dense, everything is global
    for m in (fedpara.convert(models.build("mlp"), ratio=0.5), models.build("mlp")):
        assert fedpara.local_state(m) == {} and set(fedpara.global_state(m)) == set(m.state_dict())
    lstm = fedpara.convert(models.build("char_lstm"), ratio=0.5, scheme="pfedpara")
    loc = fedpara.local_state(lstm)
    assert "lstm.weight_ih_l0.x2" in loc and "lstm.bias_hh_l1" in loc and "lstm.weight_hh_l1.x1" not in loc


def test_load_state_checks_keys_and_shapes():
    a = fedpara.convert(models.build("mlp"), ratio=0.5, scheme="pfedpara")
    b = fedpara.convert(models.build("mlp"), ratio=0.5, scheme="pfedpara")
    fedpara.load_state(b, fedpara.global_state(a))
    torch.testing.assert_close(b.fc1.x1, a.fc1.x1)
    assert not torch.equal(b.fc1.x2, a.fc1.x2)  # local half untouched
    bad = dict(fedpara.global_state(a))
    bad["fc1.x1"] = torch.zeros(3, 3)
    before = b.fc1.y1.clone()
    with pytest.raises(ValueError, match="fc1.x1"):
        fedpara.load_state(b, bad)
    torch.testing.assert_close(b.fc1.y1, before)
    with pytest.raises(ValueError, match="missing"):
        fedpara.load_state(b, {})


def test_lstm_uses_fused_kernel_and_matches_nn_lstm(monkeypatch):
    model = fedpara.convert(models.build("char_lstm", num_classes=40), ratio=0.3).eval()
    x = models.example_input("char_lstm", 2, num_classes=40)
    calls = []
    real = torch._VF.lstm

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch._VF, "lstm", spy)
    out = model(x)
    assert len(calls) == 1  # one fused call for both layers and all 80 steps
    composed = fedpara.compose(model)
    assert type(composed.lstm) is nn.LSTM
    assert (out - composed(x)).abs().max().item() <= 1e-5


def test_lstm_unbatched_and_init_std():
    lstm = fedpara.FactorisedLSTM(8, 32, 2, rank=4)
    out, (h, c) = lstm(torch.randn(5, 8))
    assert out.shape == (5, 32) and h.shape == (2, 32)
    w = lstm.weight_hh_l0.weight.detach()
    target = 1 / math.sqrt(3 * 32)
    assert target / 2 <= w.std().item() <= target * 2


def test_models_build_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.build("resnet")
    with pytest.raises(ValueError, match="num_classes"):
        models.build("mlp", num_classes=1)
