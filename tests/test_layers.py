"""Factorised layers crossed with behaviours: parity with the composed layer, gradients, rank,
initialisation, and the paper's Table 1 counts."""
import math

import pytest
import torch
from torch import nn

import fedpara
from fedpara import kernels
from fedpara.layers import CONV_BY_SCHEME, LINEAR_BY_SCHEME

SCHEMES = ["fedpara", "lowrank", "pfedpara"]

# (id, kwargs for a conv): kernel size x groups x bias x form x padding variants
CONV_CASES = [
    ("3x3", dict(in_channels=8, out_channels=12, kernel_size=3, padding=1)),
    ("3x3-nobias-stride2", dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, bias=False)),
    ("1x1", dict(in_channels=16, out_channels=8, kernel_size=1)),
    ("rect-3x5-same", dict(in_channels=6, out_channels=10, kernel_size=(3, 5), padding="same")),
    ("dilated", dict(in_channels=6, out_channels=6, kernel_size=3, dilation=2, padding=2)),
    ("groups2", dict(in_channels=8, out_channels=12, kernel_size=3, groups=2, padding=1)),
    ("reflect", dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect")),
    ("same-circular", dict(in_channels=4, out_channels=8, kernel_size=(2, 3), padding="same",
                           padding_mode="circular")),
]
FORMS = ["tensor", "matrix"]


def make_conv(scheme, form, kw, rank=3, tanh=False):
    return CONV_BY_SCHEME[scheme](**kw, rank=rank, form=form, tanh=tanh)


def reference_conv(layer):
    """nn.Conv2d with the same hyper-parameters, weight and bias as the factorised layer."""
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d
    return dense


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_parity_and_grads(scheme, bias):
    layer = LINEAR_BY_SCHEME[scheme](20, 12, rank=4, bias=bias)
    x = torch.randn(5, 20)
    ref = x @ layer.weight.T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)
    composed = fedpara.compose(layer)
    assert type(composed) is nn.Linear
    assert (layer(x) - composed(x)).abs().max() <= 1e-5
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_parity_grads_and_shape(scheme, form, case):
    _, kw = case
    layer = make_conv(scheme, form, kw)
    ref_layer = nn.Conv2d(**kw)
    assert layer.weight.shape == ref_layer.weight.shape
    x = torch.randn(2, kw["in_channels"], 11, 13)
    y = layer(x)
    dense = reference_conv(layer)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(dense, attr) == getattr(ref_layer, attr), attr
    assert y.shape == ref_layer(x).shape
    assert (y - dense(x)).abs().max().item() <= 1e-5
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_conv_tensor_form_factor_shapes(scheme):
    layer = make_conv(scheme, "tensor", dict(in_channels=8, out_channels=12, kernel_size=(3, 5), groups=2), rank=4)
    assert layer.x1.shape == (12, 4) and layer.y1.shape == (4, 4) and layer.t1.shape == (4, 4, 3, 5)
    if scheme != "lowrank":
        assert layer.t2.shape == (4, 4, 3, 5) and layer.x2.shape == (12, 4) and layer.y2.shape == (4, 4)
    else:
        assert not hasattr(layer, "t2")


def test_one_by_one_uses_matrix_form():
    layer = fedpara.FedParaConv2d(16, 8, 1, rank=4)
    assert layer.form == "matrix" and not hasattr(layer, "t1")


def test_fedpara_composition_is_the_paper_formula():
    layer = fedpara.FedParaLinear(7, 5, rank=2)
    w = (layer.x1 @ layer.y1.T) * (layer.x2 @ layer.y2.T)
    torch.testing.assert_close(layer.weight, w)
    conv = fedpara.FedParaConv2d(3, 4, 3, rank=2)
    half = [torch.einsum("abhw,oa,ib->oihw", getattr(conv, f"t{i}"), getattr(conv, f"x{i}"),
                         getattr(conv, f"y{i}")) for i in (1, 2)]
    torch.testing.assert_close(conv.weight, half[0] * half[1])
    p = fedpara.PFedParaLinear(7, 5, rank=2)
    w1, w2 = p.x1 @ p.y1.T, p.x2 @ p.y2.T
    torch.testing.assert_close(p.weight, w1 * (w2 + 1))


def test_tanh_option():
    layer = fedpara.FedParaLinear(7, 5, rank=2, tanh=True)
    w = torch.tanh(layer.x1 @ layer.y1.T) * torch.tanh(layer.x2 @ layer.y2.T)
    torch.testing.assert_close(layer.weight, w)
    assert not fedpara.FedParaLinear(7, 5, rank=2).tanh
    with pytest.raises(ValueError, match="tanh"):
        fedpara.LowRankLinear(7, 5, rank=2, tanh=True)


def test_table1_parameter_counts():
    # Paper Table 1: m = n = O = I = 256, k = 3, r = 16
    fc = fedpara.FedParaLinear(256, 256, rank=16, bias=False)
    assert sum(p.numel() for p in fc.parameters()) == 16_384  # 16K
    assert nn.Conv2d(256, 256, 3, bias=False).weight.numel() == 589_824  # 590K
    p1 = fedpara.FedParaConv2d(256, 256, 3, rank=16, form="matrix", bias=False)
    assert sum(p.numel() for p in p1.parameters()) == 81_920  # 82K
    p3 = fedpara.FedParaConv2d(256, 256, 3, rank=16, form="tensor", bias=False)
    assert sum(p.numel() for p in p3.parameters()) == 20_992  # 21K
    # the conventional low-rank conv at the same budget (<= 21K) stays at rank <= 2r = 32
    lr_rank = fedpara.rank.rank_for_ratio_dims(256, 256, (3, 3), 0.0, scheme="lowrank")
    assert kernels.param_count("lowrank", "tensor", 256, 256, 32, (3, 3)) > 20_992 >= \
        kernels.param_count("lowrank", "tensor", 256, 256, 27, (3, 3))
    assert lr_rank <= 32


def matrix_rank(w):
    """Numerical rank in float32 terms (float32 rounding noise is not rank)."""
    w = w.detach().double().reshape(w.shape[0], -1)
    return torch.linalg.matrix_rank(w, rtol=1e-5).item()


@pytest.mark.parametrize("m,n,r", [(64, 64, 4), (64, 64, 8), (100, 40, 5), (30, 50, 8)])
def test_composed_rank_reaches_r_squared(m, n, r):
    torch.manual_seed(1)
    fp = fedpara.FedParaLinear(n, m, rank=r)
    lr = fedpara.LowRankLinear(n, m, rank=r)
    assert matrix_rank(fp.weight) == min(r * r, m, n)
    assert matrix_rank(lr.weight) == r
    # with the same number of parameters the low-rank baseline gets rank 2r
    lr2 = fedpara.LowRankLinear(n, m, rank=min(2 * r, m, n))
    assert sum(p.numel() for p in lr2.parameters()) <= sum(p.numel() for p in fp.parameters())
    assert matrix_rank(lr2.weight) == min(2 * r, m, n)


def test_conv_tensor_form_rank():
    torch.manual_seed(2)
    conv = fedpara.FedParaConv2d(32, 32, 3, rank=4)
    # unfolded along the output mode, the Hadamard product reaches r^2 = 16
    assert matrix_rank(conv.weight) == 16
    assert matrix_rank(fedpara.LowRankConv2d(32, 32, 3, rank=4).weight) == 4


INIT_CASES = [
    ("linear", lambda s, t: LINEAR_BY_SCHEME[s](512, 256, rank=16, tanh=t)),
    ("linear-small", lambda s, t: LINEAR_BY_SCHEME[s](64, 10, rank=3, tanh=t)),
    ("conv-tensor", lambda s, t: CONV_BY_SCHEME[s](128, 128, 3, rank=20, tanh=t)),
    ("conv-tensor-first", lambda s, t: CONV_BY_SCHEME[s](3, 64, 3, rank=3, tanh=t)),
    ("conv-matrix", lambda s, t: CONV_BY_SCHEME[s](64, 128, 3, rank=12, form="matrix", tanh=t)),
    ("conv-1x1", lambda s, t: CONV_BY_SCHEME[s](256, 64, 1, rank=8, tanh=t)),
]


@pytest.mark.parametrize("scheme,tanh", [(s, t) for s in SCHEMES for t in (False, True)
                                         if not (t and s == "lowrank")])  # low-rank: no halves to tanh
@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_init_composed_std_matches_he(scheme, tanh, case):
    layer = case[1](scheme, tanh)
    w = layer.weight.detach()
    fan_in = w[0].numel()
    he = math.sqrt(2.0 / fan_in)
    assert he / 2 <= w.std().item() <= he * 2, (w.std().item(), he)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_init_std_every_vgg_layer(scheme, ratio):
    model = fedpara.convert(fedpara.models.build("vgg16"), ratio=ratio, scheme=scheme)
    for name, m in model.named_modules():
        if isinstance(m, fedpara.FactorisedLayer):
            w = m.weight.detach()
            he = math.sqrt(2.0 / w[0].numel())
            assert he / 2 <= w.std().item() <= he * 2, name


@pytest.mark.parametrize("kwargs,field", [
    (dict(in_features=0, out_features=4, rank=1), "in_features"),
    (dict(in_features=4, out_features=4, rank=0), "rank"),
    (dict(in_features=4, out_features=4, rank=5), "rank"),
    (dict(in_features=4, out_features=4, rank=2.5), "rank"),
])
def test_linear_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        fedpara.FedParaLinear(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(in_channels=3, out_channels=8, kernel_size=3, rank=4), "rank"),  # tensor form: r <= min(O, I)
    (dict(in_channels=6, out_channels=8, kernel_size=3, groups=4, rank=1), "groups"),
    (dict(in_channels=4, out_channels=8, kernel_size=0, rank=1), "kernel_size"),
    (dict(in_channels=4, out_channels=8, kernel_size=3, padding="full", rank=1), "padding"),
    (dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding="same", rank=1), "same"),
    (dict(in_channels=4, out_channels=8, kernel_size=3, form="cp", rank=1), "form"),
    (dict(in_channels=4, out_channels=8, kernel_size=3, padding_mode="mirror", rank=1), "padding_mode"),
])
def test_conv_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        fedpara.FedParaConv2d(**kwargs)


def test_matrix_form_allows_rank_above_in_channels():
    conv = fedpara.FedParaConv2d(3, 16, 3, rank=5, form="matrix")  # 3*3*3 = 27 columns
    assert conv.weight.shape == (16, 3, 3, 3)
