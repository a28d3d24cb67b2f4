"""Reference models by name: ``build(name, num_classes=..., **kw)``.

* ``vgg16``     VGG16 with GroupNorm for 3x32x32 (the paper's CIFAR model, Table 5). The classifier
                Linear(512,512)-Linear(512,512)-Linear(512,C) is marked to stay dense, as in the paper.
                Other inputs (e.g. Fashion-MNIST's 1x28x28) set its input channels and the pools'
                rounding (:class:`VGG16`).
* ``cnn28``     a compact CNN for 1x28x28 (Fashion-MNIST / MNIST / FEMNIST). The first conv has one
                input channel, where the tensor form would be capped at rank 1, so it stays dense
                (160 parameters) -- ours. Other (C, H, W) inputs set its channels and classifier width.
* ``mlp``       784-256-C, the paper's pFedPara model (input features: the sample size).
* ``mlp2``      784-512-512-C: two hidden layers (factorised), the output layer stays dense -- the
                MLP of the fidelity study (docs/fidelity.md), where rank can matter.

Each model's own input shape is in :data:`INPUT_SHAPES`; ``build(name, input_shape=...)`` and
``ModelSpec(input_shape=...)`` (a data spec's ``input_shape``) fit it to other data.
* ``char_lstm`` the paper's Shakespeare model: embedding 8, 2-layer LSTM 256, Linear(256, vocab).
                The embedding stays dense (it is a lookup table).

``build`` returns a dense model; factorise it with :func:`fedpara.convert`. A :class:`ModelSpec`
names a model, its scheme and ratio: everything needed to rebuild the same factorised model on
every device, with the same initial factors for the same seed.

Schemes (``ModelSpec.scheme``): ``fedpara``, ``lowrank``, ``pfedpara`` factorise the model
(:mod:`fedpara.kernels`); ``dense`` and ``fedper`` do not. Dense models built by a spec get He
initialisation in the layers the factorised schemes would factorise (:func:`fedpara.conversion.match_init`),
so dense and factorised baselines start from the same weight scale. ``fedper`` (FedPer, Arivazhagan
et al. 2019, the paper's personalisation baseline) is the dense model with its classifier head
(the last nn.Linear) kept on the device (:func:`fedpara.state.mark_personal`).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from . import kernels
from .conversion import convert, keep_dense, match_init
from .schemes import PERSONALISED
from .state import mark_personal
from .validate import check_bool, check_choice, check_int, check_number

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    check_int("input height", h, min=1)
    check_int("input width", w, min=1)
    return h, w


class VGG16(nn.Module):
    """VGG16 with GroupNorm; ``in_channels`` x ``size`` inputs (the paper's: 3x32x32).

    A 2x2 max-pool over an odd side rounds up (``ceil_mode``), so a 28x28 input ends in 1x1 like a
    32x32 one; at 3x32x32 every pool halves an even side and the model is the paper's. The
    classifier takes the 512 channels times what is left of the image.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, groups: int = 32,
                 size: int | tuple[int, int] = 32) -> None:
        super().__init__()
        check_int("in_channels", in_channels, min=1)
        h, w = _pair(size)
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True) if h % 2 or w % 2 else nn.MaxPool2d(2))
                h, w = -(-h // 2), -(-w // 2)
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.GroupNorm(min(groups, v), v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = keep_dense(nn.Sequential(
            nn.Linear(512 * h * w, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes)))

    def forward(self, x: Tensor) -> Tensor:  # (B, in_channels, H, W) -> (B, C)
        return self.classifier(self.features(x).flatten(1))


class CNN28(nn.Module):
    """Two conv + pool blocks and a two-layer classifier; ``in_channels`` x ``size`` inputs
    (default 1x28x28). The first conv stays dense (with one input channel the tensor form would be
    capped at rank 1)."""

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 256, in_channels: int = 1,
                 size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        check_int("in_channels", in_channels, min=1)
        h, w = _pair(size)
        if h < 4 or w < 4:
            raise ValueError(f"input_shape: cnn28 needs images of at least 4x4 (two 2x2 pools), got {h}x{w}")
        self.features = nn.Sequential(
            keep_dense(nn.Conv2d(in_channels, width // 2, 3, padding=1)), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(width * (h // 4) * (w // 4), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, in_channels, H, W) -> (B, C)
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, C)
        return self.fc2(self.fc1(x.flatten(1)).relu())


class MLP2(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = keep_dense(nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, C)
        return self.fc3(self.fc2(self.fc1(x.flatten(1)).relu()).relu())


class CharLSTM(nn.Module):
    def __init__(self, num_classes: int = 80, embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, T) int64 -> (B, vocab) logits of the next char
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


MODELS: dict[str, Callable[..., nn.Module]] = {"vgg16": VGG16, "cnn28": CNN28, "mlp": MLP, "mlp2": MLP2,
                                               "char_lstm": CharLSTM}
# char_lstm: 80-character windows of token ids (LEAF Shakespeare)
INPUT_SHAPES = {"vgg16": (3, 32, 32), "cnn28": (1, 28, 28), "mlp": (1, 28, 28), "mlp2": (1, 28, 28),
                "char_lstm": (80,)}


MAX_SAMPLE = 1 << 20  # values in one sample (3x512x512 fits)


def _shape_kwargs(name: str, input_shape: tuple[int, ...]) -> dict:
    """Constructor arguments that fit ``name`` to samples of ``input_shape``."""
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    if len(shape) > 4 or math.prod(shape) > MAX_SAMPLE:  # a spec in a task must not build a giant model
        raise ValueError(f"input_shape {shape}: at most 4 dims and {MAX_SAMPLE} values per sample")
    if name in ("vgg16", "cnn28"):
        if len(shape) != 3:
            raise ValueError(f"input_shape: {name} takes images (C, H, W), got {shape}")
        if name == "cnn28" and min(shape[1:]) < 4:
            raise ValueError(f"input_shape: cnn28 needs images of at least 4x4 (two 2x2 pools), got {shape}")
        return {"in_channels": shape[0], "size": shape[1:]}
    if name in ("mlp", "mlp2"):
        return {"in_features": math.prod(shape)}
    if len(shape) != 1:  # char_lstm: any window length
        raise ValueError(f"input_shape: {name} takes 1-D windows of token ids, got {shape}")
    return {}


def check_input_shape(name: str, input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple when model ``name`` can take samples of it, else ValueError."""
    check_choice("model", name, tuple(MODELS))
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
        raise ValueError(f"input_shape must be a list of ints, got {input_shape!r}")
    _shape_kwargs(name, tuple(input_shape))
    return tuple(input_shape)


def build(name: str, num_classes: int = 10, input_shape: tuple[int, ...] | None = None, **kw) -> nn.Module:
    """A dense reference model by name (see the module docstring), for samples of ``input_shape``
    (default: the model's own, :data:`INPUT_SHAPES`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    check_int("num_classes", num_classes, min=2)
    if input_shape is not None:
        kw = {**_shape_kwargs(name, input_shape), **kw}
    return MODELS[name](num_classes=num_classes, **kw)


def example_input(name: str, batch: int = 2, num_classes: int = 10, input_shape: tuple[int, ...] | None = None):
    """A valid input batch for a model name (random; for tests, export and benchmarks)."""
    shape = tuple(input_shape or INPUT_SHAPES[name])
    if name == "char_lstm":
        return torch.randint(0, num_classes, (batch, shape[0]))
    return torch.randn(batch, *shape)


SCHEMES = ("dense",) + kernels.SCHEMES + ("fedper",)


def head_name(model: nn.Module) -> str:
    """The classifier head FedPer keeps personal: the last nn.Linear in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head for FedPer")
    return names[-1]
_BUILD_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the (factorised) model: the factory that travels in tasks and
    checkpoints."""

    model: str = dataclasses.field(default="cnn28", metadata={"help": "reference model name"})
    num_classes: int = dataclasses.field(default=10, metadata={"help": "number of classes"})
    scheme: str = dataclasses.field(default="fedpara", metadata={"help": "dense|fedpara|lowrank|pfedpara|fedper"})
    ratio: float = dataclasses.field(default=0.1, metadata={"help": "the paper's gamma in [0, 1]"})
    form: str = dataclasses.field(default="tensor", metadata={"help": "conv form: tensor|matrix"})
    tanh: bool = dataclasses.field(default=False, metadata={"help": "tanh on the halves (App. B)"})
    input_shape: tuple[int, ...] | None = dataclasses.field(
        default=None, metadata={"help": "shape of one sample (the data spec's input_shape); None: the "
                                        "model's own (INPUT_SHAPES)"})

    def __post_init__(self) -> None:
        check_choice("model", self.model, tuple(MODELS))
        check_int("num_classes", self.num_classes, min=2)
        check_choice("scheme", self.scheme, SCHEMES)
        check_number("ratio", self.ratio, min=0.0, max=1.0)
        check_choice("form", self.form, kernels.FORMS)
        check_bool("tanh", self.tanh)
        if self.input_shape is not None:
            shape = check_input_shape(self.model, self.input_shape)
            # the model's own shape is stored as None: its specs (tasks, checkpoints) read as before
            object.__setattr__(self, "input_shape", None if shape == INPUT_SHAPES[self.model] else shape)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample of the built model."""
        return self.input_shape or INPUT_SHAPES[self.model]

    def build(self, seed: int = 0) -> nn.Module:
        """The model with its initial weights drawn from ``seed`` alone.

        The draws happen inside a forked RNG seeded with ``seed`` (torch's initialisers take no
        generator through ``nn.Module`` constructors), under a lock, so the initial factors depend
        on nothing that ran before and concurrent builds on other threads do not interleave; the
        caller's global RNG state is left as it was.
        """
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(self.model, num_classes=self.num_classes, input_shape=self.input_shape)
            if self.scheme in ("dense", "fedper"):
                match_init(model)  # He, like the composed weights of the factorised schemes
                if self.scheme == "fedper":
                    mark_personal(model.get_submodule(head_name(model)))
            else:
                convert(model, ratio=self.ratio, scheme=self.scheme, form=self.form, tanh=self.tanh)
        return model

    @property
    def personalised(self) -> bool:
        """True when part of the model stays on each device (pFedPara, FedPer)."""
        return self.scheme in PERSONALISED

    def dense(self) -> ModelSpec:
        """The same model, unfactorised, everything shared (the baseline whose bytes we compare against)."""
        return dataclasses.replace(self, scheme="dense")

    def to_dict(self) -> dict:
        """The fields as JSON-ready values; ``input_shape`` only when it is not the model's own, so
        the specs of models on their own data read as they always did."""
        d = dataclasses.asdict(self)
        if self.input_shape is None:
            del d["input_shape"]
        else:
            d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"model spec: expected an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model spec: unknown fields {sorted(unknown)}")
        return cls(**d)
